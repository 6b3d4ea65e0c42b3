"""The results table: one row per trained SAE, rebuilt from Tune's ResultGrid.

A trial's final report carries ``members`` (one metrics row per ladder member, JSON); each
becomes a row with the trial's penalty columns, ``tune_trial_id`` (the Tune trial) and
``trial_id`` = ``<tune trial>-m<member>`` (unique per SAE, the key of every artifact table).
A trial that failed before its final report keeps one row with status ``error``; one ASHA
stopped at a rung keeps one row with status ``stopped`` and its ``rung_objective``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs

from raysae.core.metrics import metric_names
from raysae.results import contract
from raysae.results.vocabulary import Status
from raysae.search.trial.rungs import RUNG_METRIC
from raysae.search.trial.spec import BAD_OBJECTIVE
from raysae.search.trial.trainable import STATE_FILE

PER_TRIAL = ("members", "members_l0", "objective", "ladder")


def local_checkpoint(checkpoint, fetch_to: Path | None) -> str:
    """The checkpoint's folder on this machine: as it is on local storage; on remote storage
    (s3://, any pyarrow filesystem Tune writes to) its files except the trainer state (the
    SAEs in SAELens layout, feature statistics, removal curves) copied under ``fetch_to``."""
    fs = checkpoint.filesystem
    if fs is None or isinstance(fs, pafs.LocalFileSystem) or fetch_to is None:
        return checkpoint.path
    root = checkpoint.path.rstrip("/")
    dest = Path(fetch_to) / Path(root).parent.name / Path(root).name
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        rel = info.path[len(root):].lstrip("/")
        if info.type != pafs.FileType.File or rel == STATE_FILE:
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as src, open(target, "wb") as out:
            while chunk := src.read(1 << 22):
                out.write(chunk)
    return str(dest)


def results_frame(result_grid, experiment: str, fetch_to: Path | None = None) -> pd.DataFrame:
    """One row per SAE (per member of every trial): metrics, penalty, status, paths
    (``checkpoint_path`` local: remote checkpoints are fetched under ``fetch_to``)."""
    rows = []
    for result in result_grid:
        metrics = dict(result.metrics or {})
        config = dict(result.config or {})
        config.update(config.pop("point", {}))
        trial = {"experiment": experiment,
                 **{k: v for k, v in metrics.items()
                    if k not in PER_TRIAL and not k.startswith("ladder/")},
                 "trial_objective": metrics.get("objective", math.nan)}
        trial.setdefault("penalty", config.get("penalty"))
        trial.update(_rung_columns(result))
        if trial.get("status") == Status.RUNNING and result.error is None:
            trial["status"] = Status.STOPPED  # by the stage's scheduler at a rung (ASHA)
        trial["tune_trial_id"] = metrics.get("trial_id") or os.path.basename(result.path)
        trial["trial_dir"] = result.path
        trial["checkpoint_path"] = (local_checkpoint(result.checkpoint, fetch_to)
                                    if result.checkpoint else "")
        members = json.loads(metrics["members"]) if "members" in metrics else [{}]
        for member in members:
            row = {**trial, **member}
            row["trial_id"] = f"{trial['tune_trial_id']}-m{member.get('member', 0)}"
            if result.error is not None:
                row["status"] = Status.ERROR
                row["status_reason"] = _error_reason(result.error)
            rows.append(row)
    return pd.DataFrame(rows)


def _rung_columns(result) -> dict:
    """The trial's score at its first rung (raysae.search.multifidelity), from its report history:
    a finished proposal's last report no longer carries it."""
    history = getattr(result, "metrics_dataframe", None)
    if history is None or RUNG_METRIC not in history:
        return {}
    scored = history[history[RUNG_METRIC].notna()]
    if not len(scored):
        return {}
    first = scored.iloc[0]
    return {RUNG_METRIC: float(first[RUNG_METRIC]),
            "rung_tokens": int(first["rung_tokens"])}


def _error_reason(error: BaseException) -> str:
    """The trial's own exception (Ray wraps it in RayTaskError / TuneError), in one line."""
    cause = getattr(error, "cause", None) or error.__cause__ or error
    text = f"{type(cause).__name__}: {cause}".strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else text)[:300]


def clean_trials(df: pd.DataFrame) -> pd.DataFrame:
    """Stable, analysis-ready columns; diverged/errored trials keep a clearly bad objective."""
    for col in contract.trial_columns(metric_names()):
        if col not in df:
            df[col] = math.nan
    if "status" in df:
        df["status"] = df["status"].fillna(Status.ERROR)
    bad = df["status"].isin([Status.ERROR, Status.DIVERGED]) | df["objective"].isna()
    df.loc[bad, "objective"] = BAD_OBJECTIVE
    drop = [c for c in df.columns if c.startswith(("config/", "time_", "timestamp", "pid",
                                                   "hostname", "node_ip", "date", "done"))]
    return df.drop(columns=drop).sort_values(["experiment", "trial_id"]).reset_index(drop=True)


def collect_artifacts(trials: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Each trial's threshold sweep and feature statistics, concatenated with trial_id."""
    tables: dict[str, list[pd.DataFrame]] = {key: [] for key in contract.ARTIFACT_FILES}
    trials = trials.drop_duplicates("tune_trial_id")
    for row in trials.itertuples():
        folder = getattr(row, "checkpoint_path", "") or ""
        if not isinstance(folder, str) or not folder or "://" in folder:
            continue
        for key, name in contract.ARTIFACT_FILES.items():
            path = Path(folder) / name
            if path.exists():
                df = pd.read_parquet(path)
                member = df.pop("member") if "member" in df else 0
                df.insert(0, "trial_id", row.tune_trial_id + "-m" + pd.Series(
                    member, index=df.index).astype(int).astype(str))
                tables[key].append(df)
    return {k: pd.concat(v, ignore_index=True) for k, v in tables.items() if v}


