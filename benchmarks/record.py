"""Where a benchmark's numbers came from, written beside them: a result in the docs is
rendered from such a file (findings/render.py), never typed by hand.

``write_record(path, payload, load_before)`` writes ``payload`` plus ``provenance()`` (the
commit and whether the tree had uncommitted changes, the date, the device, cores, torch, and
the 1-minute load average before and after the measurement) as JSON, atomically.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FINDINGS = ROOT / "findings" / "benchmarks"
"""Where benchmarks write their records by default (committed; rendered into docs/)."""


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def device_name() -> str:
    """The GPU's name, else the CPU's model (from /proc/cpuinfo where there is one)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def load_average() -> float:
    """The machine's 1-minute load average (what else was running)."""
    return os.getloadavg()[0]


def provenance(load_before: float | None = None) -> dict:
    """The commit, date, device and load of a measurement that ends now."""
    return {"commit": _git("rev-parse", "HEAD"),
            "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device": device_name(), "cuda": torch.cuda.is_available(),
            "cores": os.cpu_count(), "torch": torch.__version__,
            "load_before": load_before, "load_after": load_average()}


def write_record(path: str | os.PathLike, payload: dict, load_before: float | None) -> Path:
    """``payload`` with its provenance as JSON at ``path`` (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({**payload, "provenance": provenance(load_before)}, indent=1,
                              default=float) + "\n")
    os.replace(tmp, path)
    return path
