"""Where a trial writes its checkpoint folders before Tune persists them, and their cleanup
(a report blocks until the driver takes it, so a stopped or killed trial leaves them)."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

from ray import tune

from raysae.lm.local_model import cache_dir

CKPT_PREFIX = ".raysae-ckpt-"
SCRATCH_DIR = "checkpoint-scratch"
"""Checkpoint folders are written under ``RAYSAE_CACHE_DIR/checkpoint-scratch/<trial id>``
on the trial's node: not the system temp folder, and not the trial's folder, which Tune
uploads to --storage with the experiment when the driver shares the node. A trial removes
its own leftovers when it (re)starts and any older than ``SCRATCH_MAX_AGE_S``; the driver
removes its node's after each stage."""
SCRATCH_MAX_AGE_S = 3600


def scratch_root() -> Path:
    return cache_dir() / SCRATCH_DIR


def scratch_dir() -> str | None:
    try:
        trial_id = tune.get_context().get_trial_id()
    except Exception:  # outside a Tune trial
        return None
    if not trial_id:
        return None
    folder = scratch_root() / trial_id
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


def remove_stale_checkpoint_folders() -> None:
    """This trial's leftovers (a killed attempt, an earlier report), and any trial's that are
    older than an hour (a trial stopped inside its last report never cleans up)."""
    own = scratch_dir()
    remove_scratch_folders([Path(own).name] if own else [])
    cutoff = time.time() - SCRATCH_MAX_AGE_S
    for path in scratch_root().glob(f"*/{CKPT_PREFIX}*"):
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)


def remove_scratch_folders(trial_ids) -> None:
    """Delete these trials' checkpoint scratch folders on this node: a report blocks until
    the driver takes it, and a trial stopped there (its last report, or a killed worker)
    never reaches its own cleanup. Each report's checkpoint is persisted before it blocks."""
    for trial_id in trial_ids:
        if isinstance(trial_id, str) and trial_id and "/" not in trial_id:
            for path in (scratch_root() / trial_id).glob(CKPT_PREFIX + "*"):
                shutil.rmtree(path, ignore_errors=True)
