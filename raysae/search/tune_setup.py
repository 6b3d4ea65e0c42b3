"""Ray Tune + Optuna: one search as Tune experiments (the plan, the searcher, the tuner).

The stages that run them (references, search, confirmation) are in raysae.search.stages;
the results table is built from Tune's ResultGrid in raysae.search.trials_table, never from the
Optuna study (after a restore the study can hold duplicated or orphaned trials).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import optuna
from ray import tune
from ray.tune import CLIReporter
from ray.tune.search import ConcurrencyLimiter

from raysae.core.config import check_targets
from raysae.core.metrics import progress_columns
from raysae.core.penalties import reference_points
from raysae.results.vocabulary import Stage
from raysae.search.config import SearchConfig
from raysae.search.multifidelity import HALVING, RungOptunaSearch, rung_policy, rung_scheduler
from raysae.search.space import SearchSpace, reference_configs
from raysae.search.storage_files import storage_root
from raysae.search.tracking import study_path, tune_callbacks, use_journal
from raysae.search.trial.spec import TrialSpec
from raysae.search.trial.trainable import run_trial


@dataclass(frozen=True)
class SearchPlan:
    """One search as Tune runs it: the search settings, the trial spec, where it goes."""

    name: str
    """Experiment name prefix (one path component)."""
    storage: str
    """Local folder or any pyarrow filesystem URI (s3://bucket/prefix, gs://...)."""
    search: SearchConfig
    """Penalties, ranges, targets, trials, resources (gpus_per_trial resolved)."""
    spec: TrialSpec
    """What every trial shares."""
    grid: tuple[dict, ...] = ()
    """Sweep mode: the fixed trial configs (one trial each), no Optuna, no references."""
    results: str | None = None
    """The results folder on this machine: the Optuna study's journal and W&B's offline runs
    go there (raysae.search.tracking); None keeps the study in memory."""
    wandb: str | None = None
    """W&B project every trial logs to (RunSettings.wandb); None: no W&B."""
    keep_nodes: bool = False
    """Hold an autoscaling cluster's nodes through the search (RunSettings.keep_nodes)."""

    def __post_init__(self) -> None:
        check_targets(self.search.targets, self.spec.train.sae.d_sae)
        if self.spec.lambda_mode == "control" and tuple(self.spec.targets) != tuple(
                self.search.targets):
            object.__setattr__(self, "spec", replace(self.spec,
                                                     targets=tuple(self.search.targets)))

    def experiment(self, stage: Stage) -> str:
        """The Tune experiment of ``stage``: ``NAME_<stage>``, a sweep's grid ``NAME``."""
        return self.name if stage == Stage.GRID else f"{self.name}_{stage}"

    @property
    def kind(self) -> str:
        return Stage.GRID if self.grid else self.search.objective

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "storage": self.storage, "kind": self.kind,
                "grid": list(self.grid)}

    def record(self, settings: dict[str, Any]) -> dict[str, Any]:
        """search.json's content (raysae.results.contract.SEARCH_KEYS): what the search
        was, for the analysis, which never imports the search."""
        search, grid = self.search, bool(self.grid)
        return {"name": self.name, "kind": self.kind, "objective": search.objective,
                "lambda_mode": self.spec.lambda_mode,
                "targets": [] if grid or search.objective != "target" else list(search.targets),
                "penalties": list(search.penalty),
                "space": [] if grid else SearchSpace(search).describe(),
                "references": [] if grid else [list(r) for r in reference_points()],
                "settings": settings}


def build_searcher(plan: SearchPlan, seed_offset: int = 0):
    """OptunaSearch (``search.sampler``, seeded) behind a ConcurrencyLimiter; its study is
    in memory (Tune saves it with the experiment in --storage) and written out as the
    search's journal (raysae.search.tracking)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    metric, mode = ("objective", "min")
    if plan.search.objective == "pareto":
        metric, mode = ["ce_sae", "l0"], ["min", "min"]
    sampler = make_sampler(plan.search, plan.spec.train.seed + seed_offset)

    searcher = RungOptunaSearch(SearchSpace(plan.search), metric=metric, mode=mode,
                                sampler=sampler, study_name=plan.name,
                                rung_is_final=rung_policy(plan.search) == HALVING)
    return ConcurrencyLimiter(searcher, max_concurrent=plan.search.max_concurrent)


def make_sampler(search: SearchConfig, seed: int):
    """Optuna's sampler named by ``search.sampler`` (SearchConfig.sampler)."""
    startup = startup_trials(search.num_trials)
    if search.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    if search.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, scramble=True,
                                          warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)


def startup_trials(num_trials: int) -> int:
    """A model-based sampler's random start-up: a third of the proposals, at least 2 (TPE's
    default of 10 would leave a 12-proposal search almost all random)."""
    return min(num_trials, max(2, num_trials // 3))


def reference_grid(plan: SearchPlan) -> tuple[dict, ...]:
    """The references as grid points; with lambda searched, each on a lambda grid."""
    refs = reference_configs(tuple(plan.search.baselines)
                             if plan.spec.lambda_mode == "control" else ())
    if plan.spec.lambda_mode != "search":
        return tuple(refs)

    lams = np.geomspace(*plan.search.lam_range, 3).tolist()
    return tuple({**ref, "lam": float(lam)} for ref in refs for lam in lams)


def _label(target: float) -> str:
    return f"{target:g}".replace(".", "p")


def make_tuner(plan: SearchPlan, stage: Stage, spec: TrialSpec, grid: tuple[dict, ...],
               index: int, resume: bool):
    """A new Tuner, or the restored one when ``resume`` and the experiment exists."""
    search = plan.search
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec=spec),
        {"cpu": search.cpus_per_trial, "gpu": search.gpus_per_trial or 0.0})
    name = plan.experiment(stage)
    path = f"{storage_root(plan.storage).rstrip('/')}/{name}"
    if not grid:  # the search stage's searcher writes its study out here

        use_journal(None if plan.results is None else study_path(plan.results, plan.name),
                    plan.storage, plan.name)
    if resume and tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    if grid:
        searcher, num_samples, scheduler = None, 1, None
        param_space: dict[str, Any] = {"point": tune.grid_search(list(grid))}
    else:
        searcher, num_samples, param_space = (build_searcher(plan, index),
                                              search.num_trials, {})

        scheduler = rung_scheduler(plan.search, spec)
    run_config = tune.RunConfig(
        callbacks=tune_callbacks(plan.name, stage, plan.results, plan.wandb),
        name=name, storage_path=storage_root(plan.storage),
        failure_config=tune.FailureConfig(max_failures=search.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        progress_reporter=progress_table(plan, bool(grid)), verbose=1)
    return tune.Tuner(trainable, param_space=param_space, run_config=run_config,
                      tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                                  num_samples=num_samples,
                                                  max_concurrent_trials=search.max_concurrent,
                                                  reuse_actors=True))


def progress_table(plan: SearchPlan, grid: bool):
    """Tune's classic table, one row per trial with the columns a researcher watches (the
    searched parameters come from the registry, the metrics from the metrics table), every
    30 s."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    prefix = "point/" if grid else ""
    params = {f"{prefix}penalty": "penalty"}
    for item in SearchSpace(plan.search).describe():
        params[prefix + item["name"]] = item["name"]
    if grid:
        params.update({"point/power.p": "power.p", "point/lam": "lambda"})
    metrics = {"tokens_seen": "tokens", **progress_columns(), "objective": "objective",
               "status": "status"}
    return CLIReporter(parameter_columns=params, metric_columns=metrics,
                       max_report_frequency=30, sort_by_metric=False)


def grid_points(exponents, lams) -> tuple[dict, ...]:
    """The sweep's grid: pure powers (eps = 0) times lambdas."""
    return tuple({"penalty": "power", "power.p": float(p), "power.eps": 0.0, "lam": float(lam)}
                 for p in exponents for lam in lams)
