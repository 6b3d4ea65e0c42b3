"""The end-to-end job behind `raysae search|sweep` and searches/*.py: model -> activation
cache -> search -> report. It takes a validated ``JobConfig`` (raysae.search.config); the
command line lives in raysae.cli.search.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray

from raysae.activations.cache import build_cache, default_cache_root
from raysae.activations.source import ActivationSource
from raysae.analysis.report import write_report
from raysae.cluster.prometheus import monitor
from raysae.cluster.ray_env import init_ray
from raysae.core.config import SAEConfig
from raysae.results.vocabulary import EVALUATED
from raysae.search import capacity, interrupt, preflight, stored, tracking
from raysae.search.cache_plan import cache_rows, longest_training, passes_over_cache
from raysae.search.config import JobConfig
from raysae.search.stages import run_search
from raysae.search.storage_files import storage_root
from raysae.search.tracking import study_path
from raysae.search.trial.spec import TrialSpec
from raysae.search.tune_setup import SearchPlan, grid_points
from raysae.settings import JobFailed


def job_name(cfg: JobConfig, sweep: bool) -> str:
    return cfg.run.name or ("l1_sweep" if sweep else "exponent_search")


def results_dir(cfg: JobConfig, name: str) -> Path:
    if cfg.run.results:
        return Path(cfg.run.results)
    storage = cfg.run.storage
    base = storage if "://" not in storage else "results"
    return Path(base).expanduser().resolve() / name / "analysis"


def check_inputs(cfg: JobConfig, results: Path, sweep: bool) -> tuple[str, int]:
    """What the config cannot check alone (files, disks, model, hook, corpus, a given cache),
    before Ray starts or anything is written; returns the model and its hook width."""
    m, acts = cfg.model, cfg.activations
    preflight.check_metrics()
    manifest = preflight.check_cache_flag(acts.cache) if acts.cache else None
    cache_tokens = manifest["n_tokens"] if manifest else acts.cache_tokens
    preflight.check_batch(cfg.train.batch_size, cache_tokens,
                          f"--cache {acts.cache}" if manifest else "--cache-tokens")
    preflight.check_model_name(m.model)
    preflight.check_corpus(m.corpus, m.text_column)
    if cfg.run.wandb:
        tracking.check_wandb()
    preflight.preflight_writable(results)
    if "://" not in cfg.run.storage:
        preflight.preflight_writable(Path(cfg.run.storage), flag="--storage")
    if not (acts.live or acts.cache):
        preflight.preflight_writable(default_cache_root(), flag="cache (RAYSAE_CACHE_DIR)")
    model, d_in = preflight.resolve_model(m.model, m.hook)
    if not sweep:
        preflight.check_targets(cfg.search.targets, d_in, m.expansion)
    if manifest:
        preflight.check_cache_matches(acts.cache, manifest, model, m.hook, m.context_length,
                                      d_in)
    preflight.check_context_length(m.context_length, model)
    return model, d_in


def prepare_activations(cfg: JobConfig, model: str, on_cluster: bool):
    """(cache folder or live-source dict, source dict). Locally the cache is built here once
    and reused; on a cluster each node builds its own copy when its first trial needs it
    (see docs/cluster.md for why), so the driver only names the folder."""
    m, acts = cfg.model, cfg.activations
    src = ActivationSource(model=model, hook=m.hook, dataset=m.corpus,
                           text_column=m.text_column, context_length=m.context_length,
                           n_tokens=cache_rows(cfg), dtype=acts.cache_dtype)
    if acts.live:
        return dataclasses.asdict(src), None
    if acts.cache:
        return str(Path(acts.cache).expanduser().resolve()), None
    if on_cluster:
        return str(default_cache_root() / src.cache_key()), dataclasses.asdict(src)
    return str(build_cache(src, progress=True)), dataclasses.asdict(src)


def run(cfg: JobConfig, *, sweep: bool = False) -> Path:
    """The job: check, prepare, search, report; returns the results folder."""
    name = job_name(cfg, sweep)
    results = results_dir(cfg, name)
    model, d_in = check_inputs(cfg, results, sweep)
    changed = stored.check_resume(cfg, name, sweep)
    if changed:
        print(f"raysae: --resume-changed: continuing {name!r} with changed settings: "
              f"{'; '.join(changed)}", flush=True)
    acts = cfg.activations
    if cache_rows(cfg) > acts.cache_tokens and not (acts.live or acts.cache):
        print(f"raysae: --budget-check {cfg.search.budget_check:g}: the cache holds "
              f"{cache_rows(cfg)} rows, so the longer SAEs see each row once", flush=True)
    passes = None if acts.cache else passes_over_cache(cfg)
    if passes is not None and passes > 1:
        print(f"raysae: note: the longest-trained SAE reads {longest_training(cfg)} tokens "
              f"from a cache of {cache_rows(cfg)} rows, so it sees rows {passes:.1f} times "
              "and its held-out L0 will overshoot its target; --cache-tokens "
              f"{longest_training(cfg)} avoids it", flush=True)
    made = preflight.make_dirs(results)
    if "://" not in cfg.run.storage:
        made += preflight.make_dirs(Path(storage_root(cfg.run.storage)) / name)
    try:
        with interrupt.stop_on_signals():
            return _run(cfg, sweep, name, results, model, d_in)
    except BaseException:  # a failure or interrupt before any experiment leaves nothing
        stored.forget_unstarted(cfg, name)
        preflight.remove_if_empty(made)
        raise


def check_cluster(cfg: JobConfig, sweep: bool, info: dict, d_in: int) -> None:
    """Before any work on Ray: can some node ever run one trial (CPU, GPU, memory, the
    memory of its GPU share)?"""
    search = cfg.search
    gpus = search.gpus_per_trial
    if gpus is None:
        gpus = capacity.default_gpus_per_trial(info.get("resources", {}))
    members = 1 if sweep or search.lambda_mode != "control" else len(search.targets)
    memory = capacity.trial_memory_bytes(d_in, d_in * cfg.model.expansion, members,
                                          cfg.train.batch_size)
    capacity.check_cluster(ray.nodes(), cpus=search.cpus_per_trial, gpus=gpus, memory=memory,
                            address=info.get("address"), gpu_memory_gib=search.gpu_memory_gib)


def check_finished(out: Path) -> None:
    """Raise JobFailed naming the cause when no trial of the search finished."""
    trials = pd.read_parquet(out / "trials.parquet")
    if trials["status"].isin(EVALUATED).any():
        return
    reasons = trials.get("status_reason", pd.Series(dtype=object)).dropna()
    reasons = reasons[reasons.astype(str).str.strip() != ""]
    cause = (f"{reasons.iloc[0]}" if len(reasons) else
             f"statuses {sorted(set(trials['status']))}")
    raise JobFailed(f"no trial finished ({len(trials)} rows in {out / 'trials.parquet'}); "
                    f"cause: {cause}")


def _run(cfg: JobConfig, sweep: bool, name: str, results: Path, model: str,
         d_in: int) -> Path:
    """The search with, under --monitor, a local Prometheus around it (stopped also on error)."""
    with monitor(cfg.run.monitor, cfg.run.address):
        return _search(cfg, sweep, name, results, model, d_in)


def _search(cfg: JobConfig, sweep: bool, name: str, results: Path, model: str,
            d_in: int) -> Path:
    start = time.time()
    info = init_ray(cfg.run.address)
    print(f"raysae: Ray {info['mode']} at {info['address']}; dashboard: "
          f"{info.get('dashboard_url') or 'off'}", flush=True)
    interrupt.reinstall()  # after ray.init, whose SIGTERM handler would kill the driver
    check_cluster(cfg, sweep, info, d_in)
    stored.store(cfg, name, sweep)  # before any work a later --resume would continue
    if cfg.run.resume and not sweep:
        tracking.fetch_journal(cfg.run.storage, name, study_path(results, name))
    activations, source = prepare_activations(cfg, model, on_cluster=info["mode"] == "cluster")
    plan = _plan(cfg, sweep, name, info.get("resources", {}),
                 trial_spec(cfg, sweep, activations, source, model, d_in), results)
    out = run_search(plan, results, resume=cfg.run.resume, settings=cfg.to_dict())
    print(f"raysae: trials table: {out / 'trials.parquet'}")
    check_finished(out)
    if cfg.run.report:
        print(f"raysae: report: {write_report(out)}")
    print(f"raysae: Tune experiments under {plan.storage}; finished in "
          f"{time.time() - start:.0f} s", flush=True)
    print(tracking.where(plan.storage, study_path(out, name) if not sweep else None,
                         out if cfg.run.wandb else None), flush=True)
    return out


def _plan(cfg: JobConfig, sweep: bool, name: str, resources: dict,
          spec: TrialSpec, results: Path | None = None) -> SearchPlan:
    """The SearchPlan: resources resolved against the cluster, the sweep's grid."""
    search = cfg.search
    gpus = search.gpus_per_trial
    if gpus is None:
        gpus = capacity.default_gpus_per_trial(resources)
    concurrent = search.max_concurrent
    if concurrent is None:
        concurrent = capacity.default_concurrency(ray.nodes(), search.cpus_per_trial, gpus)
        print(f"raysae: up to {concurrent} trials at once ({search.cpus_per_trial:g} CPU, "
              f"{gpus:g} GPU each; --max-concurrent overrides)", flush=True)
    search = dataclasses.replace(search, gpus_per_trial=gpus, max_concurrent=concurrent)
    grid: tuple[dict, ...] = ()
    if sweep:
        lams = cfg.sweep.lambdas or np.geomspace(*search.lam_range,
                                                 cfg.sweep.n_lambdas).tolist()
        grid = grid_points(cfg.sweep.exponents, lams)
    return SearchPlan(name=name, storage=cfg.run.storage, search=search, spec=spec,
                      grid=grid, results=None if results is None else str(results),
                      wandb=cfg.run.wandb, keep_nodes=cfg.run.keep_nodes)


def trial_spec(cfg: JobConfig, sweep: bool, activations, source, model: str,
               d_in: int) -> TrialSpec:
    """What every trial of the job shares: its training template is the job's ``train``
    section (every flag of it, precision included) at the activations' width."""
    return TrialSpec(
        activations=activations, activation_source=source, model=model,
        train=dataclasses.replace(cfg.train, sae=SAEConfig(d_in, cfg.model.expansion * d_in)),
        lm=cfg.model, data=cfg.activations, search=cfg.search, run=cfg.run,
        lambda_mode="fixed" if sweep else cfg.search.lambda_mode, threshold_sweep=sweep,
        targets=() if sweep or cfg.search.lambda_mode != "control"
        else tuple(cfg.search.targets))
