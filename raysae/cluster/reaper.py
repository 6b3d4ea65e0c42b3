"""Reap the local Ray's processes when the driver that started them dies without a word.

A driver killed by SIGKILL takes its raylet and GCS with it (Ray ties them to the driver),
but Ray's dashboard agent and runtime-env agent then spend a minute reporting the raylet's
death to the dead GCS (``publish_error_to_driver``'s fixed 60 s timeout) before they exit.
``start_reaper()`` (called once a driver has started a local Ray) forks a small watcher in
its own session: while the driver lives it records the driver's descendants every second;
when the driver is gone it waits ``GRACE_S`` for an orderly exit, then SIGKILLs whatever of
them is still running (psutil checks each process's start time, so a reused PID is never
touched), and every process whose command line names the driver's Ray session folder (a
worker the raylet forked after the last look). Processes of a cluster the driver only
connected to are neither.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

GRACE_S = 2.0
POLL_S = 1.0


def start_reaper(session_dir: str) -> subprocess.Popen:
    """Watch this process (see module doc); the watcher exits soon after it does."""
    return subprocess.Popen([sys.executable, "-m", "raysae.cluster.reaper", str(os.getpid()),
                             session_dir],
                            start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _session_processes(session_dir: str) -> list:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(session_dir in arg for arg in proc.info["cmdline"] or ()):
            found.append(proc)
    return found


def watch(driver_pid: int, session_dir: str) -> int:
    """Record the driver's descendants until it ends; then kill the survivors. Returns how
    many were killed."""
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return 0
    known: dict[int, psutil.Process] = {}
    me = os.getpid()
    while True:
        try:
            if driver.status() == psutil.STATUS_ZOMBIE:
                break
            for child in driver.children(recursive=True):
                if child.pid != me:
                    known.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            break
        time.sleep(POLL_S)
    time.sleep(GRACE_S)
    killed = 0
    for proc in [*known.values(), *_session_processes(session_dir)]:
        if proc.pid == me:
            continue
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                proc.kill()
                killed += 1
        except psutil.Error:
            pass
    return killed


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
