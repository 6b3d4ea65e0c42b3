"""The results contract: what a search writes and the report reads, named once.

A results folder holds ``trials.parquet`` (one row per trained SAE, ``trial_columns``: the
trial's own fields and the metric table's columns, raysae.core.metrics, which the writer
passes in; the penalty's parameters are extra columns named after the registry's), optional
artifact tables (``ARTIFACT_FILES``) and ``search.json`` (``SEARCH_KEYS``). The search writes
only through ``write_*`` here and the report reads only through ``read_*``; a test
round-trips both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from raysae import io
from raysae.settings import UserError

TRIALS_FILE = "trials.parquet"
SEARCH_FILE = "search.json"
REPORT_FILE = "report.html"
FIGURES_DIR = "figures"
FETCHED_DIR = "checkpoints"
"""Under the results folder: trials' final checkpoints fetched from remote storage (each
SAE in SAELens layout under ``<checkpoint>/sae/<member>``, its tables beside it)."""
SAE_DIR = "sae"
"""In a trial's final checkpoint: each member's SAE in SAELens layout, ``sae/<member>``."""
ARTIFACT_FILES = {"ablations": "threshold_sweep.parquet",
                  "feature_stats": "feature_stats.parquet",
                  "activation_samples": "activation_samples.parquet"}
"""Results table name -> the file each trial's checkpoint holds (concatenated with trial_id)."""
REQUIRED_TRIAL_COLUMNS = ("trial_id", "status", "family", "l0", "ce_sae")
_TRIAL_FIELDS = ("experiment", "stage", "tune_trial_id", "member", "trial_objective",
                 "penalty", "label", "kind", "kind_options", "target_l0", "seed", "lam",
                 "objective")
"""``kind_options``: the kind's options as JSON, every field (raysae.core.kinds)."""
_TRIAL_TAIL = ("steps", "tokens_seen", "status_reason")


def trial_columns(metrics: tuple[str, ...]) -> tuple[str, ...]:
    """Every column trials.parquet has: the metric table's ``metrics`` (read by the caller
    at call time: plugins may add metrics) between the trial's own fields."""
    return tuple(dict.fromkeys((*REQUIRED_TRIAL_COLUMNS, *_TRIAL_FIELDS, *metrics,
                                *_TRIAL_TAIL)))


REQUIRED_ABLATION_COLUMNS = ("trial_id", "method", "parameter", "l0", "ce_sae")
COMPARISONS_FILE = "comparisons.parquet"
COMPARISON_COLUMNS = ("family", "reference", "basis", "target_l0", "n_seeds", "delta_ce_mean",
                      "ci_low", "ci_high", "significant")
"""One row per (family/label, reference, basis, target_l0); target_l0 NaN: the frontier
score; basis: see raysae.analysis.confidence.BASES."""
SEARCH_KEYS = ("name", "kind", "objective", "lambda_mode", "targets", "penalties", "space",
               "references", "settings")
"""kind: target | pareto | grid; space: the parameters Optuna proposed (name, family, low,
high, log); references: (label, penalty, params); settings: the job's whole config. The
search also writes ``provenance`` (versions, commit, hardware, wall time per stage)."""


def write_search_json(out: str | os.PathLike, record: dict[str, Any]) -> Path:
    missing = [k for k in SEARCH_KEYS if k not in record]
    if missing:
        raise ValueError(f"search.json record lacks keys {missing}")
    return io.write_json(Path(out) / SEARCH_FILE, record)


def read_search_json(root: str | os.PathLike) -> dict[str, Any]:
    """search.json, or {} when absent; every SEARCH_KEYS key present (None if unknown)."""
    path = Path(root) / SEARCH_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-run the search") from None
    return {**{k: None for k in SEARCH_KEYS}, **data}


def require_columns(df: pd.DataFrame, columns, name: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{name} lacks columns {missing}; the search service must write them")


def write_trials(trials: pd.DataFrame, out: str | os.PathLike, metrics: tuple[str, ...]
                 ) -> Path:
    """trials.parquet, checked to hold every column (``trial_columns(metrics)``)."""
    require_columns(trials, trial_columns(metrics), TRIALS_FILE)
    return io.write_parquet(trials, Path(out) / TRIALS_FILE)


def read_trials(root: str | os.PathLike) -> pd.DataFrame:
    path = Path(root) / TRIALS_FILE
    if not path.is_file():
        raise UserError(f"{path} not found; point at a folder written by a search")
    trials = pd.read_parquet(path)
    require_columns(trials, REQUIRED_TRIAL_COLUMNS, TRIALS_FILE)
    return trials


def write_comparisons(df: pd.DataFrame, out: str | os.PathLike) -> Path:
    require_columns(df, COMPARISON_COLUMNS, COMPARISONS_FILE)
    return io.write_parquet(df, Path(out) / COMPARISONS_FILE)


def read_comparisons(root: str | os.PathLike) -> pd.DataFrame | None:
    path = Path(root) / COMPARISONS_FILE
    if not path.is_file():
        return None
    df = pd.read_parquet(path)
    if "basis" not in df:  # written before matched-L0 comparisons: all by target
        df.insert(2, "basis", "target")
    require_columns(df, COMPARISON_COLUMNS, COMPARISONS_FILE)
    return df


def write_table(df: pd.DataFrame, out: str | os.PathLike, key: str) -> Path:
    if key not in ARTIFACT_FILES:
        raise ValueError(f"unknown results table {key!r}; known: {sorted(ARTIFACT_FILES)}")
    return io.write_parquet(df, Path(out) / f"{key}.parquet")


def read_table(root: str | os.PathLike, key: str) -> pd.DataFrame | None:
    path = Path(root) / f"{key}.parquet"
    if not path.is_file():
        return None
    df = pd.read_parquet(path)
    if key == "ablations":
        require_columns(df, REQUIRED_ABLATION_COLUMNS, path.name)
    return df
