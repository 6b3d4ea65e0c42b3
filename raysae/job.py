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

from raysae.search import SearchSettings, grid_points, run_search
from raysae.trainable import LAMBDA_MODES, TrialSpec


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
    a("--context-length", type=int, help="override the preset's tokens per block")
    a("--targets", type=float, nargs="+", help="target L0 values (one Optuna study each)")
    a("--num-trials", type=int, help="trials per target L0 (Optuna searches)")
    a("--max-concurrent", type=int, default=2, help="trials running at once (default 2)")
    a("--total-tokens", type=int, help="training tokens per SAE")
    a("--cache-tokens", type=int, help="activation rows in the cache")
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
    else:
        a("--lambdas", type=float, nargs="+", help="lambda grid (default: log-spaced)")
        a("--exponents", type=float, nargs="+", default=[1.0, 0.5, 0.25],
          help="penalty exponents p, one family each (default: 1 0.5 0.25)")


def _check(args: argparse.Namespace) -> None:
    for name in ("num_trials", "total_tokens", "cache_tokens", "max_concurrent",
                 "context_length"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} = {value} is invalid: must be >= 1")
    for t in args.targets or ():
        if t <= 0:
            raise ValueError(f"--targets {t:g} is invalid: a target L0 must be > 0")
    if getattr(args, "objective", None) == "pareto" and args.lambda_mode == "control":
        raise ValueError("--objective pareto needs --lambda-mode search: lambda must vary "
                         "to trace a frontier")


def prepare_activations(preset: Preset, args, model: str, on_cluster: bool):
    """(cache folder or live-source dict, source dict). Locally the cache is built here once
    and reused; on a cluster each node builds its own copy when its first trial needs it
    (see docs/cluster.md for why), so the driver only names the folder."""
    from raysae.activation_cache import build_cache, default_cache_root
    from raysae.activations import ActivationSource

    src = ActivationSource(model=model, hook=preset.hook, dataset=preset.corpus,
                           text_column=preset.text_column, context_length=preset.context_length,
                           n_tokens=args.cache_tokens or preset.cache_tokens,
                           dtype=preset.cache_dtype)
    if args.live:
        return dataclasses.asdict(src), None
    if on_cluster:
        return str(default_cache_root() / src.cache_key()), dataclasses.asdict(src)
    return str(build_cache(src, progress=True)), dataclasses.asdict(src)


def resolve_model(preset: Preset, args) -> tuple[str, int]:
    """The model (built locally for the default preset) and its hook width, hook checked."""
    from raysae.local_model import default_model
    from raysae.models import check_hook, load_model

    model = args.model or preset.model or str(default_model(progress=True))
    lm = load_model(model, device="cpu")
    check_hook(lm, preset.hook)
    return model, int(lm.cfg.d_model)


def _results_dir(args, name: str) -> Path:
    if args.results:
        return Path(args.results)
    base = args.storage if "://" not in args.storage else "results"
    return Path(base).expanduser().resolve() / name / "analysis"


def run(args: argparse.Namespace, *, sweep: bool = False) -> int:
    """The job: prepare, search, report; prints where everything is."""
    from raysae.ray_env import init_ray

    _check(args)
    preset = PRESETS[args.preset]
    preset = dataclasses.replace(preset, hook=args.hook or preset.hook,
                                 corpus=args.corpus or preset.corpus,
                                 context_length=args.context_length or preset.context_length)
    name = args.name or ("l1_sweep" if sweep else "exponent_search")
    results = _results_dir(args, name)
    preflight_writable(results)
    start = time.time()
    info = init_ray(args.address)
    print(f"raysae: Ray {info['mode']} at {info['address']}; dashboard: "
          f"{info.get('dashboard_url') or 'off'}", flush=True)
    model, d_in = resolve_model(preset, args)
    activations, source = prepare_activations(preset, args, model,
                                              on_cluster=info["mode"] == "cluster")
    gpus = args.gpus_per_trial
    if gpus is None:
        gpus = 0.25 if info.get("resources", {}).get("GPU", 0) else 0.0
    settings = _settings(args, preset, sweep, name, gpus, TrialSpec(
        activations=activations, activation_source=source, model=model, hook=preset.hook, d_in=d_in,
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
        from raysae.report import write_report

        print(f"raysae: report: {write_report(out)}")
    print(f"raysae: Tune experiments under {settings.storage}; finished in "
          f"{time.time() - start:.0f} s", flush=True)
    return 0


def _settings(args, preset: Preset, sweep: bool, name: str, gpus: float,
              spec: TrialSpec) -> SearchSettings:
    common = dict(name=name, storage=args.storage, max_concurrent=args.max_concurrent,
                  seed=args.seed, gpus_per_trial=gpus, cpus_per_trial=1.0, spec=spec)
    if sweep:
        import numpy as np

        lams = args.lambdas or np.geomspace(*preset.lam_range, preset.sweep_lambdas).tolist()
        families = [{"p": p, "s": 1.0} for p in args.exponents]
        return SearchSettings(objective="grid", grid=grid_points(families, lams),
                              num_trials=1, **common)
    return SearchSettings(objective=args.objective,
                          targets=tuple(args.targets or preset.targets),
                          num_trials=args.num_trials or preset.num_trials,
                          lam_range=preset.lam_range, **common)


def preflight_writable(folder: Path) -> None:
    """Fail before any work when the results folder cannot be written (read-only, full)."""
    import shutil
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".raysae-write-test-") as f:
            f.write(b"x" * 65536)
            f.flush()
    except OSError as exc:
        raise ValueError(f"results folder {folder} is not writable ({exc.strerror}); "
                         f"pass --results to a writable folder") from None
    free = shutil.disk_usage(folder).free
    if free < 100 * 1024**2:
        raise ValueError(f"results folder {folder} has only {free // 1024**2} MiB free; "
                         f"free space or pass --results elsewhere")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                     argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each flag; the script's docstring kept as written."""


def main(argv=None, *, sweep: bool = False, description: str = "") -> int:
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    add_arguments(parser, sweep=sweep)
    args = parser.parse_args(argv)
    try:
        return run(args, sweep=sweep)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
