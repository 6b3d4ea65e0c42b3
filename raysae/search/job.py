"""The end-to-end job behind searches/*.py: model -> activation cache -> search -> report.

Presets name the study's setting (``pythia-70m``: EleutherAI/pythia-70m-deduped, layer-3
residual stream, 4x SAE, the Pile) and the embedded default (``local``: the locally built
GPT-NeoX and the standard library's sources, done in minutes on 2 cores, offline).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from raysae.search import preflight as job_checks
from raysae.search.trainable import LAMBDA_MODES, TrialSpec
from raysae.search.tune_setup import SearchSettings, grid_points, live_concurrency, run_search


@dataclass(frozen=True)
class Preset:
    """Model, data and training size of one experiment setting."""

    model: str | None  # None: the locally built default model
    hook: str
    corpus: str
    text_column: str = "text"
    context_length: int = 128
    expansion: int = 4
    cache_tokens: int = 200_000
    total_tokens: int = 1_000_000
    batch_size: int = 512
    lr: float = 1e-3
    targets: tuple[float, ...] = (8.0, 16.0, 32.0)
    num_trials: int = 6
    lam_range: tuple[float, float] = (1e-2, 1e2)
    eval_blocks: int = 64
    cache_dtype: str = "float32"
    sweep_lambdas: int = 5
    sweep_lam_range: tuple[float, float] = (0.3, 10.0)  # lambdas giving L0 ~ 5-100 here


PRESETS = {
    "local": Preset(model=None, hook="blocks.1.hook_resid_post", corpus="stdlib"),
    "pythia-70m": Preset(
        model="EleutherAI/pythia-70m-deduped", hook="blocks.3.hook_resid_post",
        corpus="monology/pile-uncopyrighted", context_length=128, cache_tokens=50_000_000,
        total_tokens=400_000_000, batch_size=4096, lr=1e-3, targets=(15.0, 30.0, 60.0),
        num_trials=24, eval_blocks=256, cache_dtype="float16", sweep_lambdas=15),
}


def add_arguments(parser: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    """Flags shared by the searches/ scripts; every flag says what it does."""
    a = parser.add_argument
    a("--preset", choices=sorted(PRESETS), default="local",
      help="experiment setting: 'local' (default: offline local model and stdlib text) or "
           "'pythia-70m' (the study: Pythia-70M-deduped, layer 3 resid, 4x SAE, the Pile)")
    a("--model", help="override the preset's model: hub name or local checkpoint folder")
    a("--hook", help="override the preset's hook name, e.g. blocks.3.hook_resid_post")
    a("--corpus", help="override the text: 'stdlib', local files/folder, or a hub dataset")
    a("--text-column", help="override the preset's text column of a table corpus")
    a("--context-length", type=int, help="override the preset's tokens per block")
    a("--expansion", type=int, help="d_sae = EXPANSION * d_in (default: the preset's, 4)")
    a("--batch-size", type=int, help="activations per optimiser step (default: the preset's)")
    a("--targets", type=float, nargs="+", help="target L0 values (one Optuna study each)")
    a("--num-trials", type=int, help="trials per target L0 (Optuna searches)")
    a("--max-concurrent", type=int, default=2, help="trials running at once (default 2)")
    a("--cpus-per-trial", type=float, default=1.0,
      help="CPU share per trial; fractions (e.g. 0.25) let more trials share a core")
    a("--total-tokens", type=int, help="training tokens per SAE")
    a("--cache-tokens", type=int, help="activation rows in the cache")
    a("--cache", help="use this existing activation cache folder (checked against the model, "
                      "hook and context length) instead of building one")
    a("--lam-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
      help="lambda range, log scale: searched with --lambda-mode search; the sweep's default "
           "grid (default: the preset's, 0.01 100)")
    a("--storage", default=os.environ.get("RAYSAE_STORAGE", "results"),
      help="where Tune keeps experiments: a folder or s3://bucket/prefix "
           "(default $RAYSAE_STORAGE or ./results)")
    a("--results", help="folder for trials.parquet and report.html (default: STORAGE/NAME "
                        "when STORAGE is local, else ./results/NAME)")
    a("--name", help="search name (default: the script's name)")
    a("--resume", action="store_true",
      help="continue an interrupted search of the same name: finished trials are kept, "
           "unfinished ones resume from their last checkpoint")
    a("--live", action="store_true",
      help="stream activations from the Ray Data pipeline into each trial (no cache)")
    a("--address", help="Ray cluster address (default: $RAY_ADDRESS, a running cluster, or "
                        "an embedded local Ray)")
    a("--gpus-per-trial", type=float, default=None,
      help="GPU share per trial (default: 0.25 when the cluster has GPUs, else 0)")
    a("--seed", type=int, default=0, help="seed for Optuna's TPE sampler and the SAEs")
    a("--no-report", action="store_true", help="skip writing report.html at the end")
    if not sweep:
        a("--lambda-mode", choices=LAMBDA_MODES[:2], default="control",
          help="control (default): a feedback controller drives L0 to the target and Optuna "
               "searches p and s; search: Optuna also searches lambda")
        a("--objective", choices=("target", "pareto"), default="target",
          help="target (default): CE at the target L0; pareto: minimise [ce_sae, l0]")
        a("--beta", type=float, default=1.0,
          help="objective weight of missing the target L0 (nats per unit |ln(l0/target)|)")
        a("--p-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
          help="searched exponent range, inside (0, 2] (default 0.2 1)")
        a("--s-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
          help="searched scale range (log scale), > 0 (default 0.01 100)")
    else:
        a("--lambdas", type=float, nargs="+", help="lambda grid (default: log-spaced)")
        a("--exponents", type=float, nargs="+", default=[1.0, 0.5, 0.25],
          help="penalty exponents p, one family each (default: 1 0.5 0.25)")


def prepare_activations(preset: Preset, args, model: str, on_cluster: bool):
    """(cache folder or live-source dict, source dict). Locally the cache is built here once
    and reused; on a cluster each node builds its own copy when its first trial needs it
    (see docs/cluster.md for why), so the driver only names the folder."""
    from raysae.activations.cache import build_cache, default_cache_root
    from raysae.activations.source import ActivationSource

    src = ActivationSource(model=model, hook=preset.hook, dataset=preset.corpus,
                           text_column=preset.text_column, context_length=preset.context_length,
                           n_tokens=args.cache_tokens or preset.cache_tokens,
                           dtype=preset.cache_dtype)
    if args.live:
        return dataclasses.asdict(src), None
    if args.cache:
        return str(Path(args.cache).expanduser().resolve()), None
    if on_cluster:
        return str(default_cache_root() / src.cache_key()), dataclasses.asdict(src)
    return str(build_cache(src, progress=True)), dataclasses.asdict(src)


def resolve_model(preset: Preset, args) -> tuple[str, int]:
    """The model (built locally for the default preset) and its hook width, hook checked."""
    from raysae.lm.local_model import default_model
    from raysae.lm.models import load_model

    model = args.model or preset.model or str(default_model(progress=True))
    try:
        lm = load_model(model, device="cpu")
    except (OSError, ValueError) as err:
        raise ValueError(f"--model {model}: {' '.join(str(err).split())}") from None
    job_checks.check_hook(lm, preset.hook, model)
    return model, int(lm.cfg.d_model)


def _results_dir(args, name: str) -> Path:
    if args.results:
        return Path(args.results)
    base = args.storage if "://" not in args.storage else "results"
    return Path(base).expanduser().resolve() / name / "analysis"


def effective_preset(args) -> Preset:
    """The preset with the command line's overrides applied."""
    preset = PRESETS[args.preset]
    over = {"hook": args.hook, "corpus": args.corpus, "text_column": args.text_column,
            "context_length": args.context_length, "expansion": args.expansion,
            "batch_size": args.batch_size,
            "lam_range": tuple(args.lam_range) if args.lam_range else None}
    return dataclasses.replace(preset, **{k: v for k, v in over.items() if v is not None})


def check_inputs(args, preset: Preset, results: Path, sweep: bool) -> tuple[str, int]:
    """Every check that can fail on bad input, before Ray starts or anything is written
    (raysae/search/preflight.py); returns the model and its hook width."""
    job_checks.check_flags(args, preset, sweep)
    manifest = job_checks.check_cache_flag(args.cache) if args.cache else None
    cache_tokens = manifest["n_tokens"] if manifest else args.cache_tokens or preset.cache_tokens
    job_checks.check_batch(preset.batch_size, cache_tokens,
                           f"--cache {args.cache}" if manifest else "--cache-tokens")
    job_checks.check_model_name(args.model or preset.model)
    job_checks.check_corpus(preset.corpus, preset.text_column)
    job_checks.preflight_writable(results)
    if "://" not in args.storage:
        job_checks.preflight_writable(Path(args.storage), flag="--storage")
    if not (args.live or args.cache):
        from raysae.activations.cache import default_cache_root

        job_checks.preflight_writable(default_cache_root(), flag="cache (RAYSAE_CACHE_DIR)")
    model, d_in = resolve_model(preset, args)
    if not sweep:
        job_checks.check_targets(args.targets or preset.targets, d_in, preset.expansion)
    if manifest:
        job_checks.check_cache_matches(args.cache, manifest, model, preset.hook,
                                       preset.context_length, d_in)
    return model, d_in


def run(args: argparse.Namespace, *, sweep: bool = False) -> int:
    """The job: check, prepare, search, report; prints where everything is."""
    preset = effective_preset(args)
    name = args.name or ("l1_sweep" if sweep else "exponent_search")
    results = _results_dir(args, name)
    model, d_in = check_inputs(args, preset, results, sweep)
    made = job_checks.make_dirs(results)
    try:
        return _run(args, preset, sweep, name, results, model, d_in)
    except ValueError:
        job_checks.remove_if_empty(made)  # a late failure leaves no empty results folder
        raise


def _run(args, preset: Preset, sweep: bool, name: str, results: Path, model: str,
         d_in: int) -> int:
    from raysae.cluster.ray_env import init_ray

    start = time.time()
    info = init_ray(args.address)
    print(f"raysae: Ray {info['mode']} at {info['address']}; dashboard: "
          f"{info.get('dashboard_url') or 'off'}", flush=True)
    activations, source = prepare_activations(preset, args, model,
                                              on_cluster=info["mode"] == "cluster")
    gpus = args.gpus_per_trial
    if gpus is None:
        gpus = 0.25 if info.get("resources", {}).get("GPU", 0) else 0.0
    cpus, concurrent = args.cpus_per_trial, args.max_concurrent
    if args.live:  # each trial's harvest actor needs a CPU outside the trial's own share
        cpus = min(cpus, 0.5)
        concurrent = live_concurrency(info.get("resources", {}).get("CPU", 1), concurrent, cpus)
    settings = _settings(args, preset, sweep, name, (gpus, cpus, concurrent), TrialSpec(
        activations=activations, activation_source=source, model=model, hook=preset.hook,
        d_in=d_in,
        d_sae=preset.expansion * d_in, context_length=preset.context_length,
        total_tokens=args.total_tokens or preset.total_tokens, batch_size=preset.batch_size,
        lr=preset.lr, lambda_mode="fixed" if sweep else args.lambda_mode,
        beta=1.0 if sweep else args.beta, eval_blocks=preset.eval_blocks,
        target_l0=None if sweep or args.objective == "pareto"
        else (args.targets or preset.targets)[0],
        corpus=preset.corpus, threshold_sweep=sweep, seed=args.seed))
    out = run_search(settings, results, resume=args.resume)
    print(f"raysae: trials table: {out / 'trials.parquet'}")
    if not args.no_report:
        from raysae.analysis.report import write_report

        print(f"raysae: report: {write_report(out)}")
    print(f"raysae: Tune experiments under {settings.storage}; finished in "
          f"{time.time() - start:.0f} s", flush=True)
    return 0


def _settings(args, preset: Preset, sweep: bool, name: str,
              resources: tuple[float, float, int], spec: TrialSpec) -> SearchSettings:
    """SearchSettings from the flags; ``resources`` = (GPUs, CPUs per trial, concurrency)."""
    gpus, cpus, concurrent = resources
    common = dict(name=name, storage=args.storage, max_concurrent=concurrent,
                  seed=args.seed, gpus_per_trial=gpus, cpus_per_trial=cpus,
                  lam_range=preset.lam_range, spec=spec)
    if sweep:
        import numpy as np

        low_high = tuple(args.lam_range) if args.lam_range else preset.sweep_lam_range
        lams = args.lambdas or np.geomspace(*low_high, preset.sweep_lambdas).tolist()
        families = [{"p": p, "s": 1.0} for p in args.exponents]
        return SearchSettings(objective="grid", grid=grid_points(families, lams),
                              num_trials=1, **common)
    ranges = {k: tuple(v) for k in ("p_range", "s_range") if (v := getattr(args, k))}
    return SearchSettings(objective=args.objective,
                          targets=tuple(args.targets or preset.targets),
                          num_trials=args.num_trials or preset.num_trials, **ranges, **common)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                     argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each flag; the script's docstring kept as written."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line and exit status 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see --help\n")


def main(argv=None, *, sweep: bool = False, description: str = "") -> int:
    """Parse the flags and run the job; bad input -> one line on stderr, exit status 2."""
    parser = _Parser(description=description, formatter_class=_HelpFormatter)
    add_arguments(parser, sweep=sweep)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a flag argparse refused (2, message printed)
        return int(exc.code or 0)
    try:
        return run(args, sweep=sweep)
    except (ValueError, ConnectionError) as err:  # ConnectionError: --address unreachable
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
