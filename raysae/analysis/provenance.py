"""Where a result came from: versions, commit, hardware and wall time per stage, recorded in
search.json by the search and shown by the report."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

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
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "gpus": gpus or "none", "python": platform.python_version(),
            "platform": platform.platform()}


def collect(stage_seconds: dict[str, float]) -> dict[str, Any]:
    """Everything the report's provenance block shows."""
    return {"versions": {p: _version(p) for p in PACKAGES}, "commit": git_commit(),
            "hardware": hardware(),
            "stage_seconds": {k: round(v, 1) for k, v in stage_seconds.items()}}
