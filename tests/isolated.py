"""Run a rehearsal script in its own process group and make sure nothing it started (Ray
processes marked by its private RAY_TMPDIR) outlives it; shared by the multi-node and the
autoscaler rehearsals."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ancestors() -> set[int]:
    """This process and its parents (a `timeout` or shell that started it may carry the
    mark in its environment too)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


def pids_using(marker: str) -> list[int]:
    """Processes (not this one or its parents) whose command line or environment names
    ``marker``."""
    pids, skip = [], _ancestors()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            text = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if marker.encode() in text:
            pids.append(int(entry.name))
    return pids


def reap(marker: str, grace: float = 15.0) -> list[int]:
    """Wait up to ``grace`` s for the marked processes to end, SIGKILL the rest; returns
    the pids that had to be killed."""
    deadline = time.time() + grace
    while pids_using(marker) and time.time() < deadline:
        time.sleep(0.5)
    left = pids_using(marker)
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return left


def run_rehearsal(cmd: list[str], ray_tmp: Path, timeout: float) -> tuple[int, str, list[int]]:
    """(exit status, output, pids that outlived it) of ``cmd`` run with a private
    RAY_TMPDIR and no inherited cluster address, killed after ``timeout`` seconds."""
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": "",
           "RAYSAE_RAY_ADDRESS": ""}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        output += f"\n[killed after {timeout} s]"
    finally:
        left = reap(str(ray_tmp))
    return proc.returncode, output, left
