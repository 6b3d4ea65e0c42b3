"""Where a result came from: versions, commit, hardware, wall time per stage and where each
stage's time went, recorded in search.json by the search and shown by the report."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("raysae", "torch", "ray", "optuna", "transformer_lens", "transformers", "pandas")


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    """The raysae checkout's commit (with '+dirty' for uncommitted changes), or 'unknown'."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=5, check=True).stdout
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.strip() + ("+dirty" if dirty.strip() else "")


def hardware() -> dict[str, Any]:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "gpus": gpus or "none", "python": platform.python_version(),
            "platform": platform.platform()}


TIME_PARTS = ("train", "eval", "setup", "outside_trials")
"""Where a stage's core-seconds went (``time_breakdown``): training steps; evaluation of the
trained ladders (spliced CE, feature statistics); a trial's own start (restoring a checkpoint,
opening the cache, building the trainer); and outside trials: Ray starting each trial's
process, scheduling, and slots left idle (the stage's tail, waiting for a cache)."""


def time_breakdown(trials, stage_seconds: dict[str, float], slots: int,
                   cores_per_trial: float) -> dict[str, dict[str, float]]:
    """Per stage and ``total``: core-seconds of each of ``TIME_PARTS`` and ``available``
    (wall time x slots x cores per trial), from the trials' own timings (train_seconds,
    eval_seconds, setup_seconds of their last attempt; earlier attempts of a restored trial
    count as outside trials)."""
    out: dict[str, dict[str, float]] = {}
    per_trial = trials.drop_duplicates("tune_trial_id") if "tune_trial_id" in trials else trials
    for stage, wall in stage_seconds.items():
        rows = per_trial[per_trial["stage"] == stage] if "stage" in per_trial else per_trial[:0]
        used = {part: float(rows[f"{part}_seconds"].sum()) * cores_per_trial
                if f"{part}_seconds" in rows else 0.0 for part in TIME_PARTS[:3]}
        available = wall * slots * cores_per_trial
        out[stage] = {**used, "outside_trials": max(available - sum(used.values()), 0.0),
                      "available": available}
    out["total"] = {k: sum(v[k] for v in out.values()) for k in (*TIME_PARTS, "available")}
    return {stage: {k: round(v, 1) for k, v in parts.items()} for stage, parts in out.items()}


def collect(stage_seconds: dict[str, float], time_spent: dict | None = None) -> dict[str, Any]:
    """Everything the report's provenance block shows."""
    return {"versions": {p: _version(p) for p in PACKAGES}, "commit": git_commit(),
            "hardware": hardware(),
            "stage_seconds": {k: round(v, 1) for k, v in stage_seconds.items()},
            "core_seconds": time_spent or {}}
