"""A search's stages, each one Tune experiment, run in order and resumable:

1. ``<name>_refs``: the references (the study's L1, sqrt, sqrt(sqrt), and the baseline SAE
   kinds) as a fixed grid, seed 0. L1's CE per target becomes the search's zero point.
2. ``<name>_search``: Optuna's ``num_trials`` proposals (each trial scores its whole ladder;
   raysae.search.spec).
3. ``<name>_confirm`` (``seeds`` R > 1): the best ``confirm_best`` proposals and every
   reference retrained with seeds 1 .. R-1. Paired design: seed r gives every penalty the same
   SAE initialisation and the same activation order, so stage 1-2's seed-0 SAEs are the
   first replicate and differences are taken seed by seed (raysae.analysis.confidence).

A sweep is one grid stage. Results always come from Tune's ResultGrids (raysae.search.results).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from raysae.analysis import contract, provenance
from raysae.search import interrupt
from raysae.search.results import _clean, collect_artifacts, results_frame
from raysae.search.space import penalty_of
from raysae.search.trainable import remove_scratch_folders
from raysae.search.tune_setup import SearchPlan, make_tuner, reference_grid

STAGE_SECONDS: dict[str, float] = {}
"""Wall time of each stage run by this process (for search.json's provenance)."""


def _fit(plan: SearchPlan, name: str, spec, grid, index: int, resume: bool,
         fetch_to: Path) -> pd.DataFrame:
    stage = name.rsplit("_", 1)[-1] if not plan.grid else "grid"
    start = time.perf_counter()
    with interrupt.tune_stage():  # a stop signal ends Tune's loop, then raises Interrupted
        result_grid = make_tuner(plan, name, spec, grid, index, resume).fit()
    frame = results_frame(result_grid, name, fetch_to)
    remove_scratch_folders(frame.get("tune_trial_id", ()))
    STAGE_SECONDS[stage] = time.perf_counter() - start
    return frame.assign(stage=stage)


def reference_ce(refs: pd.DataFrame, targets) -> tuple[float, ...] | None:
    """L1's ce_sae per target (seed 0), or None when any is missing."""
    if not {"family", "status", "target_l0", "ce_sae"} <= set(refs.columns):
        return None  # e.g. every reference failed before its final report
    l1 = refs[(refs["family"] == "L1") & (refs["status"] == "finished")]
    by_target = dict(zip(l1["target_l0"], l1["ce_sae"]))
    values = tuple(by_target.get(float(t), math.nan) for t in targets)
    return values if all(math.isfinite(v) for v in values) else None


def confirmation_grid(plan: SearchPlan, searched: pd.DataFrame) -> tuple[dict, ...]:
    """(best proposals + references) x seeds 1 .. R-1, as trial configs."""
    seeds = plan.search.seeds
    if seeds <= 1:
        return ()
    best = []
    if len(searched) and "trial_objective" in searched:
        ok = searched[searched["status"].isin(["finished", "partial"])]
        per_trial = ok.drop_duplicates("tune_trial_id").nsmallest(plan.search.confirm_best,
                                                                  "trial_objective")
        for _, row in per_trial.iterrows():
            name = row["penalty"]
            params = {k: float(row[k]) for k in _param_names(name) if k in row}
            config = {"penalty": name, **{f"{name}.{k}": v for k, v in params.items()}}
            if row.get("kind", "relu") not in ("relu", None) and row.get("kind") == row.get(
                    "kind"):
                config["kind"] = row["kind"]
            if plan.spec.lambda_mode == "search":
                config["lam"] = float(row["lam"])
            best.append(config)
    configs = list(reference_grid(plan)) + best
    return tuple({**c, "seed": s} for s in range(1, seeds) for c in configs)


def _param_names(penalty: str) -> list[str]:
    from raysae.core.penalties import get_penalty

    return list(get_penalty(penalty).param_names())


def run_search(plan: SearchPlan, results_dir: str | os.PathLike, *, resume: bool = False,
               settings: dict[str, Any] | None = None) -> Path:
    """Run (or resume) every stage of the search; write the tables and search.json
    (``settings``: the job's whole config, for the report); return the folder."""
    frames, fetch = [], Path(results_dir) / contract.FETCHED_DIR
    if plan.grid:
        frames.append(_fit(plan, plan.name, plan.spec, plan.grid, 0, resume, fetch))
    else:
        refs = _fit(plan, f"{plan.name}_refs", plan.spec, reference_grid(plan), 0, resume,
                    fetch)
        frames.append(refs)
        spec = plan.spec
        if spec.lambda_mode == "control":
            spec = replace(spec, reference_ce=reference_ce(refs, plan.search.targets))
        searched = _fit(plan, f"{plan.name}_search", spec, (), 1, resume, fetch)
        frames.append(searched)
        grid = confirmation_grid(plan, searched)
        if grid:
            frames.append(_fit(plan, f"{plan.name}_confirm", spec, grid, 2, resume, fetch))
    trials = _clean(pd.concat(frames, ignore_index=True))
    out = Path(results_dir)
    if resume:
        trials = keep_earlier_rows(trials, out)
    out.mkdir(parents=True, exist_ok=True)
    contract.write_trials(trials, out)
    for key, df in collect_artifacts(trials).items():
        contract.write_table(df, out, key)
    comparisons = compare_trials(trials)
    if comparisons is not None:
        contract.write_comparisons(comparisons, out)
    record = contract.search_record(plan, settings or {})
    record["provenance"] = provenance.collect(dict(STAGE_SECONDS))
    contract.write_search_json(out, record)
    return out


def keep_earlier_rows(trials: pd.DataFrame, out: Path) -> pd.DataFrame:
    """A resumed search's table keeps every finished row of the earlier trials.parquet that
    Tune's experiments no longer return (nothing finished ever drops out)."""
    try:
        earlier = contract.read_trials(out)
    except (OSError, ValueError):
        return trials
    lost = earlier[~earlier["trial_id"].isin(trials["trial_id"])
                   & earlier["status"].isin(["finished", "partial", "diverged"])]
    if not len(lost):
        return trials
    return pd.concat([trials, lost], ignore_index=True).sort_values(
        ["experiment", "trial_id"]).reset_index(drop=True)


def compare_trials(trials: pd.DataFrame) -> pd.DataFrame | None:
    """comparisons.parquet: every label against L1 and sqrt, per target and over the ladder
    (None for a sweep, whose SAEs have no targets)."""
    from raysae.analysis.confidence import compare

    laddered = trials[trials["target_l0"].notna()]
    if not len(laddered):
        return None
    present = set(laddered["label"])
    refs = [r for r in ("L1", "sqrt", "TopK", "BatchTopK") if r in present]
    return compare(laddered, references=refs)


__all__ = ["run_search", "confirmation_grid", "reference_ce", "penalty_of"]
