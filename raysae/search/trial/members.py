"""Evaluate a trial's trained SAEs (its ladder members) on the same held-out blocks, the
pre-hook forward done once for all of them, and write their artifacts."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from raysae import io
from raysae.activations.batches import iter_activation_batches
from raysae.activations.cache import load_manifest
from raysae.core.config import TrainConfig
from raysae.core.outcome import DIVERGED, FINISHED
from raysae.evaluation import feature_stats
from raysae.evaluation.ablation import threshold_sweep
from raysae.evaluation.spliced_ce import heldout_evaluator
from raysae.lm.models import load_model
from raysae.results import contract
from raysae.search.trial.spec import BAD_OBJECTIVE, TrialSpec, frontier_score, member_objective

SWEEP_FILE = contract.ARTIFACT_FILES["ablations"]


def _feature_source(spec: TrialSpec, evaluator):
    """Activations for feature statistics: ``feature_tokens`` rows of the cache (the held-out
    set is too small to see a 1e-5 frequency), or the held-out set when streaming live."""
    if not isinstance(spec.activations, str) or not os.path.isdir(spec.activations):
        return evaluator

    n_tokens = min(spec.data.feature_tokens, int(load_manifest(spec.activations)["n_tokens"]))
    return iter_activation_batches(spec.activations, 4096, n_tokens=n_tokens,
                                   seed=spec.train.seed)


def _base(k: int, target: float | None, result) -> dict[str, Any]:
    return {**result.final_metrics, "member": k,
            "target_l0": float("nan") if target is None else float(target),
            "status": result.status, "lam": result.lam, "steps": result.steps,
            "tokens_seen": result.tokens, "status_reason": result.reason or ""}


_HELDOUT: dict[tuple, Any] = {}
"""This process's held-out evaluator (one): Tune reuses a trial's actor for the next trial
(``reuse_actors``), which then skips the model load and the clean forward (about 6 s of a
rung's 9 on one core)."""


def heldout(spec: TrialSpec, cfg: TrainConfig):
    """The held-out evaluator every score of a trial uses (spliced CE on the same blocks);
    built once per process for a given model, device, hook and held-out set."""
    key = (str(spec.model), str(cfg.device), spec.lm.hook, spec.data.eval_blocks,
           spec.lm.context_length, repr(spec.lm.corpus))
    if key not in _HELDOUT:
        _HELDOUT.clear()  # one model's memory at a time
        _HELDOUT[key] = heldout_evaluator(
            load_model(spec.model, device=cfg.device), spec.lm.hook,
            n_blocks=spec.data.eval_blocks, context_length=spec.lm.context_length,
            source=spec.lm.corpus)
    return _HELDOUT[key]


def rung_score(spec: TrialSpec, cfg: TrainConfig, results: list, evaluator) -> float:
    """The search's objective (``frontier_score``) of the ladder as it stands mid-training:
    held-out CE and L0 of every member that has not diverged; what ASHA compares at a rung."""
    rows = []
    for target, result in zip(spec.ladder, results):
        row = {"target_l0": target}
        if result.status != DIVERGED:
            row.update(evaluator.evaluate(result.sae.to(cfg.device)))
        rows.append(row)
    return frontier_score(rows, spec)


def evaluate_members(spec: TrialSpec, cfg: TrainConfig, results: list, evaluator=None):
    """(one metrics row per member, a function writing every member's artifacts);
    ``evaluator``: the trial's held-out evaluator when a rung already built it."""
    rows = [_base(k, t, r) for k, (t, r) in enumerate(zip(spec.ladder, results))]
    live = [k for k, r in enumerate(results) if r.status != DIVERGED]
    for k in set(range(len(results))) - set(live):
        rows[k].update(objective=BAD_OBJECTIVE, ce_sae=BAD_OBJECTIVE,
                       l0=float(cfg.sae.d_sae))
    stats, sweeps = {}, {}
    if live and evaluator is None:
        evaluator = heldout(spec, cfg)
    for k in live:
        sae, row = results[k].sae.to(cfg.device), rows[k]
        row.update(evaluator.evaluate(sae))
        stats[k] = feature_stats.feature_statistics(_feature_source(spec, evaluator), sae,
                                                    spec.data.feature_tokens)
        summary = feature_stats.summarize(*stats[k])
        row.update({c: summary[c] for c in feature_stats.SUMMARY_COLUMNS})
        target = None if math.isnan(row["target_l0"]) else row["target_l0"]
        row["objective"] = member_objective(row["ce_sae"], row["l0"], target, spec.search.beta,
                                            spec.search.tol)
        if spec.threshold_sweep and results[k].status == FINISHED:
            sweeps[k] = threshold_sweep(evaluator, sae, n_points=spec.sweep_points)

    def write_artifacts(folder: Path) -> None:
        for k in live:
            results[k].sae.save(folder / contract.SAE_DIR / str(k),
                                metadata={"model_name": spec.model, "hook_name": spec.lm.hook},
                                raysae={"train_config": cfg.to_dict(), "member": k,
                                        "target_l0": rows[k]["target_l0"],
                                        "status": results[k].status,
                                        "final_lambda": results[k].lam})
        _write_member_tables(folder, stats, sweeps)

    return rows, write_artifacts


def _write_member_tables(folder: Path, stats: dict, sweeps: dict) -> None:
    """feature_stats / activation_samples / threshold sweeps with a ``member`` column."""
    if stats:
        per_feature = pd.concat([s[0].assign(member=k) for k, s in stats.items()])
        samples = pd.concat([s[1].assign(member=k) for k, s in stats.items()])
        io.write_parquet(per_feature, folder / contract.ARTIFACT_FILES["feature_stats"])
        io.write_parquet(samples, folder / contract.ARTIFACT_FILES["activation_samples"])
    if sweeps:
        io.write_parquet(pd.concat([s.assign(member=k) for k, s in sweeps.items()]),
                         folder / SWEEP_FILE)
