"""Ray Tune + Optuna over the penalty (p, s) and lambda, with resume and a results table.

One Tune experiment per target L0 (the objective depends on the target, so each target is
its own Optuna study), or one Pareto experiment with objectives [ce_sae, l0]. Results are
always rebuilt from Tune's ResultGrid, never from the Optuna study (after a restore the
study can hold duplicated or orphaned trials).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from raysae.search.trainable import BAD_OBJECTIVE, SWEEP_FILE, TrialSpec, run_trial

OBJECTIVES = ("target", "pareto", "grid")
# The study's known points, tried first in every Optuna study.
STUDY_POINTS = ({"p": 1.0}, {"p": 0.5, "s": 1.0}, {"p": 0.25, "s": 1.0})


@dataclass(frozen=True)
class SearchSettings:
    """One search: what to vary, how many trials, where results go."""

    name: str = "exponent_search"
    storage: str = "results"
    """Local folder or any pyarrow filesystem URI (s3://bucket/prefix, gs://...)."""
    objective: str = "target"
    """target: ce_sae + L0-miss penalty per target L0; pareto: [ce_sae, l0]; grid: no Optuna."""
    targets: tuple[float, ...] = (16.0,)
    num_trials: int = 8
    """Trials per target (target mode) or in all (pareto mode)."""
    max_concurrent: int = 2
    p_range: tuple[float, float] = (0.2, 1.0)
    s_range: tuple[float, float] = (1e-2, 1e2)
    lam_range: tuple[float, float] = (1e-2, 1e2)
    grid: tuple[dict, ...] = ()
    """Grid mode: the trial configs ({p, s, lam}), one trial each."""
    seed: int = 0
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 2
    """Retries of a failed trial (from its last checkpoint)."""
    spec: TrialSpec | None = None

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective = {self.objective!r} is invalid: allowed {OBJECTIVES}")
        if self.num_trials < 1:
            raise ValueError(f"num_trials = {self.num_trials} is invalid: allowed >= 1")
        if self.max_concurrent < 1:
            raise ValueError(f"max_concurrent = {self.max_concurrent} is invalid: allowed >= 1")
        if self.spec is not None:
            for t in self.targets:
                if not 0 < t <= self.spec.d_sae:
                    raise ValueError(f"target L0 {t} is invalid: allowed (0, d_sae="
                                     f"{self.spec.d_sae}]")
        lo, hi = self.p_range
        if not 0 < lo <= hi <= 2:
            raise ValueError(f"p_range = {self.p_range} is invalid: need 0 < low <= high <= 2")

    @property
    def search_lambda(self) -> bool:
        return self.spec is None or self.spec.lambda_mode == "search"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SearchSpace:
    """The define-by-run space: p; s only when p < 1 (for p = 1 it only rescales lambda);
    lambda (log scale) only when it is searched. A class, not a closure: Tune pickles the
    searcher into its experiment checkpoint."""

    def __init__(self, settings: SearchSettings):
        self.p_range, self.s_range, self.lam_range = (settings.p_range, settings.s_range,
                                                      settings.lam_range)
        self.search_lambda = settings.search_lambda

    def __call__(self, trial) -> None:
        p = trial.suggest_float("p", *self.p_range)
        if p < 1.0:
            trial.suggest_float("s", *self.s_range, log=True)
        if self.search_lambda:
            trial.suggest_float("lam", *self.lam_range, log=True)


def seed_points(settings: SearchSettings) -> list[dict[str, float]]:
    """The study's L1, sqrt and sqrt(sqrt), where they fit the searched p range."""
    lo, hi = settings.p_range
    return [dict(pt) for pt in STUDY_POINTS if lo <= pt["p"] <= hi]


def build_searcher(settings: SearchSettings, seed_offset: int = 0):
    """OptunaSearch (TPE with a seed) behind a ConcurrencyLimiter; None in grid mode."""
    if settings.objective == "grid":
        return None
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    metric, mode = ("objective", "min")
    if settings.objective == "pareto":
        metric, mode = ["ce_sae", "l0"], ["min", "min"]
    sampler = optuna.samplers.TPESampler(seed=settings.seed + seed_offset,
                                         n_startup_trials=min(6, settings.num_trials))
    searcher = OptunaSearch(SearchSpace(settings), metric=metric, mode=mode,
                            points_to_evaluate=seed_points(settings), sampler=sampler)
    return ConcurrencyLimiter(searcher, max_concurrent=settings.max_concurrent)


def live_concurrency(total_cpus: float, requested: int, cpus_per_trial: float = 0.5,
                     cpus_per_actor: float = 1.0) -> int:
    """Trials that may stream live at once: each holds ``cpus_per_trial`` and its harvest
    actor needs ``cpus_per_actor`` more outside the trial's reservation, so more trials than
    this would leave their Ray Data actors waiting forever (a deadlock on 2 CPUs)."""
    return max(1, min(requested, int(total_cpus // (cpus_per_trial + cpus_per_actor))))


def experiment_runs(settings: SearchSettings) -> list[tuple[str, TrialSpec]]:
    """(experiment name, trial spec) per Tune experiment of this search."""
    if settings.objective != "target":
        return [(settings.name, settings.spec)]
    return [(f"{settings.name}_l0_{_label(t)}", replace(settings.spec, target_l0=float(t)))
            for t in settings.targets]


def _label(target: float) -> str:
    return f"{target:g}".replace(".", "p")


def storage_root(storage: str) -> str:
    """Absolute local path or an untouched URI (pyarrow resolves s3://, gs://, ...)."""
    return storage if "://" in storage else os.path.abspath(os.path.expanduser(storage))


def make_tuner(settings: SearchSettings, name: str, spec: TrialSpec, index: int,
               resume: bool):
    """A new Tuner, or the restored one when ``resume`` and the experiment exists."""
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec=spec),
        {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial})
    path = f"{storage_root(settings.storage).rstrip('/')}/{name}"
    if resume and tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    searcher = build_searcher(settings, seed_offset=index)
    param_space: dict[str, Any] = {"seed": 0}
    num_samples = settings.num_trials
    if settings.objective == "grid":
        param_space = {"point": tune.grid_search(list(settings.grid)), "seed": 0}
        num_samples = 1
    failure = tune.FailureConfig(max_failures=settings.max_failures)
    run_config = tune.RunConfig(
        name=name, storage_path=storage_root(settings.storage), failure_config=failure,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        progress_reporter=progress_table(settings), verbose=1)
    return tune.Tuner(trainable, param_space=param_space, run_config=run_config,
                      tune_config=tune.TuneConfig(search_alg=searcher, num_samples=num_samples,
                                                  max_concurrent_trials=settings.max_concurrent,
                                                  reuse_actors=False))


def progress_table(settings: SearchSettings):
    """Tune's classic table, one row per trial with the columns a researcher watches, every
    30 s (the default output prints every metric of every finished trial)."""
    from ray.tune import CLIReporter

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    params = {"p": "p", "s": "s"}
    if settings.search_lambda:
        params["lam"] = "lambda"
    if settings.objective == "grid":  # grid values sit under "point" in the trial config
        params = {"point/p": "p", "point/s": "s", "point/lam": "lambda"}
    metrics = {"tokens_seen": "tokens", "l0": "L0", "fvu": "FVU", "ce_sae": "CE",
               "objective": "objective", "status": "status"}
    return CLIReporter(parameter_columns=params, metric_columns=metrics,
                       max_report_frequency=30, sort_by_metric=False)


def results_frame(result_grid, experiment: str) -> pd.DataFrame:
    """One row per trial: config, final metrics, status, paths (from the ResultGrid)."""
    rows = []
    for result in result_grid:
        metrics = dict(result.metrics or {})
        config = dict(result.config or {})
        config.update(config.pop("point", {}))
        row = {"experiment": experiment, **{k: v for k, v in config.items() if k != "seed"},
               **metrics}
        row["trial_id"] = metrics.get("trial_id") or os.path.basename(result.path)
        if result.error is not None:
            row["status"] = "error"
            row["status_reason"] = _error_reason(result.error)
        row["trial_dir"] = result.path
        row["checkpoint_path"] = result.checkpoint.path if result.checkpoint else ""
        rows.append(row)
    return pd.DataFrame(rows)


def _error_reason(error: BaseException) -> str:
    """The trial's own exception (Ray wraps it in RayTaskError / TuneError), in one line."""
    cause = getattr(error, "cause", None) or error.__cause__ or error
    text = f"{type(cause).__name__}: {cause}".strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else text)[:300]


def _clean(df: pd.DataFrame) -> pd.DataFrame:
    """Stable, analysis-ready columns; diverged/errored trials keep a clearly bad objective."""
    for col in ("objective", "ce_sae", "l0", "s", "lam", "target_l0"):
        if col not in df:
            df[col] = math.nan
    df["s"] = df["s"].fillna(1.0)
    bad = df["status"].isin(["error", "diverged"]) | df["objective"].isna()
    df.loc[bad, "objective"] = BAD_OBJECTIVE
    drop = [c for c in df.columns if c.startswith(("config/", "time_", "timestamp", "pid",
                                                   "hostname", "node_ip", "date", "done"))]
    return df.drop(columns=drop).sort_values(["experiment", "trial_id"]).reset_index(drop=True)


def collect_artifacts(trials: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Each trial's threshold sweep and feature statistics, concatenated with trial_id."""
    tables: dict[str, list[pd.DataFrame]] = {"ablations": [], "feature_stats": [],
                                             "activation_samples": []}
    files = {"ablations": SWEEP_FILE, "feature_stats": "feature_stats.parquet",
             "activation_samples": "activation_samples.parquet"}
    for row in trials.itertuples():
        folder = getattr(row, "checkpoint_path", "") or ""
        if not folder or "://" in folder:
            continue
        for key, name in files.items():
            path = Path(folder) / name
            if path.exists():
                df = pd.read_parquet(path)
                df.insert(0, "trial_id", row.trial_id)
                tables[key].append(df)
    return {k: pd.concat(v, ignore_index=True) for k, v in tables.items() if v}


def run_search(settings: SearchSettings, results_dir: str | os.PathLike, *,
               resume: bool = False) -> Path:
    """Run (or resume) every experiment of the search; write the tables; return the folder."""
    from raysae.evaluation.feature_stats import write_parquet

    frames = []
    for index, (name, spec) in enumerate(experiment_runs(settings)):
        tuner = make_tuner(settings, name, spec, index, resume)
        frames.append(results_frame(tuner.fit(), name))
    trials = _clean(pd.concat(frames, ignore_index=True))
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(trials, out / "trials.parquet")
    for key, df in collect_artifacts(trials).items():
        write_parquet(df, out / f"{key}.parquet")
    _write_json(out / "search.json", settings.to_dict())
    return out


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def grid_points(families: Sequence[dict], lams: Sequence[float]) -> tuple[dict, ...]:
    """The cartesian product of penalty points and lambdas, for grid mode."""
    return tuple({**fam, "lam": float(lam)} for fam in families for lam in lams)


