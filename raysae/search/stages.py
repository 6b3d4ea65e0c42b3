"""A search's stages, each one Tune experiment, run in order and resumable:

1. ``<name>_refs``: the references (the study's L1, sqrt, sqrt(sqrt), and the baseline SAE
   kinds) as a fixed grid, seed 0. L1's CE per target becomes the search's zero point.
2. ``<name>_search``: Optuna's ``num_trials`` proposals (each trial scores its whole ladder;
   raysae.search.trial.spec), stopped at ``rung`` (raysae.search.multifidelity; status
   ``stopped``): all of them under successive halving, whose ``<name>_promote`` stage then
   trains the ``promote`` best at the rung to the full budget, seed 0; under ASHA, those
   outside the best seen there.
3. ``<name>_confirm`` (``seeds`` R > 1): the best ``confirm_best`` proposals and every
   reference retrained with seeds 1 .. R-1. Paired design: seed r gives every penalty the same
   SAE initialisation and the same activation order, so stage 1-2's seed-0 SAEs are the
   first replicate and differences are taken seed by seed (raysae.analysis.confidence; a
   proposal's own seed-0 replicate, which chose it, is left out of its comparisons).
4. ``<name>_budget`` (``budget_check`` k): the references and the best proposal retrained
   with k times the training tokens, seeds 0 .. R-1; their rows carry ``budget`` k (1 for
   the others) and comparisons are made within each budget.

A sweep is one grid stage. Results always come from Tune's ResultGrids (raysae.search.trials_table).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import ray

from raysae.analysis import provenance
from raysae.analysis.confidence import REFERENCES, compare
from raysae.core.kinds import DEFAULT_KIND, baseline_labels
from raysae.core.metrics import metric_names
from raysae.core.penalties import get_penalty
from raysae.results import contract
from raysae.results.vocabulary import EVALUATED, Stage, Status
from raysae.search import interrupt
from raysae.search.multifidelity import halving_stop, stage_rung_tokens
from raysae.search.node_hold import NodeHold, held_nodes
from raysae.search.space import penalty_of
from raysae.search.tracking import close_journal
from raysae.search.trial.rungs import RUNG_METRIC
from raysae.search.trial.scratch import remove_scratch_folders
from raysae.search.trials_table import clean_trials, collect_artifacts, results_frame
from raysae.search.tune_setup import SearchPlan, make_tuner, reference_grid

STAGE_SECONDS: dict[str, float] = {}
"""Wall time of each stage run by this process (for search.json's provenance)."""


def fit_stage(plan: SearchPlan, stage: Stage, spec, grid, index: int, resume: bool,
              fetch_to: Path, hold: NodeHold | None = None) -> pd.DataFrame:
    """Run (or resume) one stage as its Tune experiment (``grid``: fixed trial configs;
    empty: Optuna's proposals); its results table, with its wall time recorded. ``hold``
    keeps the cluster at least as large as this stage needs (raysae.search.node_hold)."""
    start = time.perf_counter()
    if hold is not None:
        hold.stage(len(grid) or plan.search.num_trials)
    with interrupt.tune_stage():  # a stop signal ends Tune's loop, then raises Interrupted
        result_grid = make_tuner(plan, stage, spec, grid, index, resume).fit()
    frame = results_frame(result_grid, plan.experiment(stage), fetch_to)
    if stage == Stage.SEARCH:
        close_journal()
    remove_scratch_folders(frame.get("tune_trial_id", ()))
    STAGE_SECONDS[stage] = time.perf_counter() - start
    return frame.assign(stage=stage)


def reference_ce(refs: pd.DataFrame, targets) -> tuple[float, ...] | None:
    """L1's ce_sae per target (seed 0), or None when any is missing."""
    if not {"family", "status", "target_l0", "ce_sae"} <= set(refs.columns):
        return None  # e.g. every reference failed before its final report
    l1 = refs[(refs["family"] == "L1") & (refs["status"] == Status.FINISHED)]
    by_target = dict(zip(l1["target_l0"], l1["ce_sae"]))
    values = tuple(by_target.get(float(t), math.nan) for t in targets)
    return values if all(math.isfinite(v) for v in values) else None


def confirmation_grid(plan: SearchPlan, searched: pd.DataFrame) -> tuple[dict, ...]:
    """(best proposals + references) x seeds 1 .. R-1, as trial configs."""
    seeds = plan.search.seeds
    if seeds <= 1:
        return ()
    configs = list(reference_grid(plan)) + best_configs(plan, searched, plan.search.confirm_best)
    return tuple({**c, "seed": s} for s in range(1, seeds) for c in configs)


def budget_grid(plan: SearchPlan, searched: pd.DataFrame) -> tuple[dict, ...]:
    """(the best proposal + references) x seeds 0 .. R-1, as trial configs."""
    configs = list(reference_grid(plan)) + best_configs(plan, searched, 1)
    return tuple({**c, "seed": s} for s in range(max(plan.search.seeds, 1)) for c in configs)


def promotion_grid(plan: SearchPlan, searched: pd.DataFrame) -> tuple[dict, ...]:
    """Successive halving: the ``promote`` proposals with the best rung scores, seed 0."""
    return tuple(best_configs(plan, searched, plan.search.promote, by=RUNG_METRIC,
                              statuses=(Status.STOPPED,)))


def best_configs(plan: SearchPlan, searched: pd.DataFrame, n: int, by: str = "trial_objective",
                 statuses=EVALUATED) -> list[dict]:
    """The ``n`` best proposals (by the search objective, or ``by``) as trial configs."""
    best = []
    if len(searched) and by in searched:
        ok = searched[searched["status"].isin(statuses) & searched[by].notna()]
        per_trial = ok.drop_duplicates("tune_trial_id").nsmallest(n, by)
        for _, row in per_trial.iterrows():
            name = row["penalty"]
            params = {k: float(row[k]) for k in _param_names(name) if k in row}
            config = {"penalty": name, **{f"{name}.{k}": v for k, v in params.items()}}
            kind = row.get("kind")
            if isinstance(kind, str) and kind != DEFAULT_KIND:  # not missing (NaN/None)
                config["kind"] = kind
            if plan.spec.lambda_mode == "search":
                config["lam"] = float(row["lam"])
            best.append(config)
    return best


def _param_names(penalty: str) -> list[str]:
    return list(get_penalty(penalty).param_names())


def run_search(plan: SearchPlan, results_dir: str | os.PathLike, *, resume: bool = False,
               settings: dict[str, Any] | None = None) -> Path:
    """Run (or resume) every stage of the search; write the tables and search.json
    (``settings``: the job's whole config, for the report); return the folder."""
    fetch = Path(results_dir) / contract.FETCHED_DIR
    STAGE_SECONDS.clear()  # this search's stages only (a process may run several searches)
    with held_nodes(plan.search, trial_slots(plan.search), plan.keep_nodes) as hold:
        frames = run_stages(plan, resume, fetch, hold)
    trials = clean_trials(pd.concat(frames, ignore_index=True))
    if "budget" in trials:
        trials["budget"] = trials["budget"].fillna(1.0)
    out = Path(results_dir)
    if resume:
        trials = keep_earlier_rows(trials, out)
    out.mkdir(parents=True, exist_ok=True)
    contract.write_trials(trials, out, metric_names())
    for key, df in collect_artifacts(trials).items():
        contract.write_table(df, out, key)
    comparisons = compare_trials(trials)
    if comparisons is not None:
        contract.write_comparisons(comparisons, out)
    record = plan.record(settings or {})
    search = plan.search  # a trial holds cpus_per_trial cores (and its GPU share) throughout
    record["provenance"] = provenance.collect(dict(STAGE_SECONDS), provenance.time_breakdown(
        trials, dict(STAGE_SECONDS), trial_slots(search), search.cpus_per_trial))
    contract.write_search_json(out, record)
    return out


def run_stages(plan: SearchPlan, resume: bool, fetch: Path, hold: NodeHold
               ) -> list[pd.DataFrame]:
    """Every stage of the search in order (a sweep: its grid); their results tables."""
    frames = []
    if plan.grid:
        frames.append(fit_stage(plan, Stage.GRID, plan.spec, plan.grid, 0, resume, fetch, hold))
    else:
        refs = fit_stage(plan, Stage.REFS, plan.spec, reference_grid(plan), 0,
                         resume, fetch, hold)
        frames.append(refs)
        spec = plan.spec
        if spec.lambda_mode == "control":
            spec = replace(spec, reference_ce=reference_ce(refs, plan.search.targets))
        proposed, searched = propose(plan, spec, resume, fetch, hold)
        frames += proposed
        grid = confirmation_grid(plan, searched)
        if grid:
            frames.append(fit_stage(plan, Stage.CONFIRM, spec, grid, 2, resume, fetch, hold))
        factor = plan.search.budget_check
        if factor:
            longer = replace(spec, train=replace(
                spec.train, total_tokens=int(round(spec.train.total_tokens * factor))))
            frames.append(fit_stage(plan, Stage.BUDGET, longer,
                                    budget_grid(plan, searched), 3, resume, fetch, hold
                                    ).assign(budget=float(factor)))
    return frames


def propose(plan: SearchPlan, spec, resume: bool, fetch_to: Path, hold: NodeHold | None = None
            ) -> tuple[list[pd.DataFrame], pd.DataFrame]:
    """Optuna's proposals: the search stage and, under successive halving, the promotion
    of the best at the rung to the full budget (``spec``: the references' zero point set).
    Returns (their tables, the one the best proposals are chosen from)."""
    total, batch = spec.train.total_tokens, spec.train.batch_size
    stop = halving_stop(plan.search, total, batch)
    searched = fit_stage(plan, Stage.SEARCH, replace(
        spec, rung_tokens=stage_rung_tokens(plan.search, total, batch), stop_tokens=stop), (), 1,
        resume, fetch_to, hold)
    if not stop:
        return [searched], searched
    promoted = fit_stage(plan, Stage.PROMOTE, spec, promotion_grid(plan, searched), 1,
                         resume, fetch_to, hold)
    return [searched, promoted], promoted


def trial_slots(search) -> int:
    """How many trials could run at once: the job's resolved --max-concurrent, else (a plan
    built without the job) what the Ray cluster's CPUs hold."""
    if search.max_concurrent:
        return int(search.max_concurrent)

    cpus = ray.cluster_resources().get("CPU", 1.0) if ray.is_initialized() else 1.0
    return max(int(cpus // search.cpus_per_trial), 1)


def keep_earlier_rows(trials: pd.DataFrame, out: Path) -> pd.DataFrame:
    """A resumed search's table keeps every finished row of the earlier trials.parquet that
    Tune's experiments no longer return (nothing finished ever drops out)."""
    try:
        earlier = contract.read_trials(out)
    except (OSError, ValueError):
        return trials
    lost = earlier[~earlier["trial_id"].isin(trials["trial_id"])
                   & earlier["status"].isin([*EVALUATED, Status.DIVERGED, Status.STOPPED])]
    if not len(lost):
        return trials
    return pd.concat([trials, lost], ignore_index=True).sort_values(
        ["experiment", "trial_id"]).reset_index(drop=True)


def compare_trials(trials: pd.DataFrame) -> pd.DataFrame | None:
    """comparisons.parquet: every label against L1 and sqrt and the baseline kinds, per
    target and over the ladder (None for a sweep, whose SAEs have no targets)."""
    laddered = trials[trials["target_l0"].notna()]
    if not len(laddered):
        return None
    present = set(laddered["label"])
    refs = [r for r in (*REFERENCES, *baseline_labels()) if r in present]
    budgets = laddered["budget"] if "budget" in laddered else pd.Series(1.0, laddered.index)
    return pd.concat([compare(laddered[budgets == b], references=refs).assign(budget=b)
                      for b in sorted(set(budgets))], ignore_index=True)


__all__ = ["run_search", "fit_stage", "propose", "confirmation_grid", "reference_ce",
           "penalty_of"]
