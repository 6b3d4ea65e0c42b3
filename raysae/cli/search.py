"""`raysae search` and `raysae sweep`: the main job's flags, generated from the config tree.

Every flag is a field of raysae.search.config (help = the field's docstring); the preset
sits under the flags (defaults < preset < flags). searches/exponent_search.py and
searches/l1_sweep.py are thin wrappers of these two subcommands.
"""

from __future__ import annotations

import argparse
import dataclasses

from raysae.cli.flags import add_range_flags, add_section, given
from raysae.core.config import TrainConfig
from raysae.core.kinds import KINDS, baseline_kinds, penalty_kinds
from raysae.core.penalties import PENALTIES
from raysae.core.recipes import RECIPES
from raysae.search.config import (
    NO_BASELINES,
    PRESETS,
    TRAIN_INTERNAL,
    ActivationSettings,
    ModelSettings,
    SearchConfig,
    job_config,
)
from raysae.search.run_settings import RunSettings, SweepSettings


def searchable_params() -> dict[str, str]:
    """Every searched (family, parameter) of the registry as "family_param" -> its help."""
    out: dict[str, str] = {}
    for spec in PENALTIES.values():
        for p in spec.searched_params():
            lo, hi = p.search
            out[f"{spec.name}_{p.name}"] = (f"{spec.name}: {p.doc} (searched {lo:g}..{hi:g}"
                                           f"{', log' if p.log else ''})")
    return out


def add_job_flags(parser: argparse.ArgumentParser, *, sweep: bool) -> None:
    """Every flag of the job, grouped by config section."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="experiment setting: 'local' (default: offline local model and "
                             "stdlib text) or 'pythia-70m' (the study's setting)")
    add_section(parser, ModelSettings, "model and data")
    add_section(parser, ActivationSettings, "activations")
    add_section(parser, TrainConfig, "training", skip=TRAIN_INTERNAL,
                choices={"recipe": tuple(RECIPES)})
    skip = ("ranges",) + (("penalty", "objective", "lambda_mode", "targets", "num_trials",
                           "beta", "tol") if sweep else ())
    add_section(parser, SearchConfig, "search", skip=skip,  # kinds: from the registry
                choices={"kind": penalty_kinds(),
                         "baselines": (*baseline_kinds(), NO_BASELINES)})
    if sweep:
        add_section(parser, SweepSettings, "sweep")
    else:
        add_range_flags(parser, searchable_params())
    add_section(parser, RunSettings, "run")
    for name, kind in KINDS.items():  # each kind's options (TrainConfig.kind_options)
        if dataclasses.fields(kind.Options):
            add_section(parser, kind.Options, f"options of kind {name}", prefix=name)


def run_command(args: argparse.Namespace, *, sweep: bool) -> int:
    """Build and validate the whole config, then run the job."""
    # on use: the job's stack (Ray Tune, pyarrow) loads when a search runs
    from raysae.search.job import run

    values = given(args)
    cfg = job_config(values.pop("preset", None) or "local", sweep=sweep, **values)
    run(cfg, sweep=sweep)
    return 0


def add_parsers(subparsers) -> None:
    """Register `search` and `sweep`."""
    for name, sweep, text in (
            ("search", False, "search the sparsity penalty (Optuna via Ray Tune) per target "
                              "L0; the main job"),
            ("sweep", True, "the study's baseline: a lambda grid for pure powers (L1, sqrt, "
                            "sqrt(sqrt)) with threshold-removal curves")):
        p = subparsers.add_parser(name, help=text, description=text)
        add_job_flags(p, sweep=sweep)
        p.set_defaults(func=lambda args, sweep=sweep: run_command(args, sweep=sweep))
