"""Multi-node rehearsal: a head and two worker nodes (ray.cluster_utils.Cluster); the two
trials of a search run on different nodes; one worker is removed mid-search and the search
still ends with a complete table (the lost trial restarts from its checkpoint elsewhere).

The cluster lives in a subprocess (one Ray runtime per process; the session's ``ray_local``
may be running here) with its own RAY_TMPDIR, so its address file and session folders are
private, and the test checks that none of its Ray processes outlive it."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


def _pids_using(marker: str) -> list[int]:
    """Processes whose command line or environment names ``marker`` (our private RAY_TMPDIR)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            text = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if marker.encode() in text:
            pids.append(int(entry.name))
    return pids


def _run_rehearsal(model_dir: Path, workdir: Path, ray_tmp: Path) -> tuple[dict, str]:
    summary = workdir / "summary.json"
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": "",
           "RAYSAE_RAY_ADDRESS": ""}
    cmd = [sys.executable, str(ROOT / "tests" / "cluster_rehearsal.py"), "--model",
           str(model_dir), "--workdir", str(workdir), "--summary", str(summary)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        output += f"\n[killed after {TIMEOUT_S} s]"
    finally:
        _reap(str(ray_tmp))
    assert proc.returncode == 0, output[-6000:]
    return json.loads(summary.read_text()), output


def _reap(marker: str) -> None:
    """Kill (by pid) any process of this rehearsal still alive, then fail if one was."""
    deadline = time.time() + 15
    while _pids_using(marker) and time.time() < deadline:
        time.sleep(0.5)
    left = _pids_using(marker)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"Ray processes of the rehearsal outlived it: {left}"


@pytest.mark.slow  # ~60-75 s here: three Ray nodes, a Ray Data cache build, two trials
def test_trials_spread_over_nodes_and_survive_losing_a_worker(tiny_model_dir, tmp_path):
    ray_tmp = Path(os.path.realpath("/tmp")) / f"rsmn-{os.getpid()}-{time.time_ns() % 10**6}"
    ray_tmp.mkdir()  # short: Ray's socket paths under it must stay < 108 characters
    try:
        summary, output = _run_rehearsal(tiny_model_dir, tmp_path, ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print("rehearsal seconds (cumulative):", summary["seconds"])
    workers = set(summary["workers"])
    first, final = summary["first_nodes"], summary["final_nodes"]
    # The two trials first ran on the two different workers (never on the 0-CPU head).
    assert len(first) == 2 and set(first.values()) == workers, summary
    lost = summary["removed_trial"]
    assert first[lost] == summary["removed_node"]
    # The lost trial finished elsewhere, from its checkpoint; the table is complete.
    trials = pd.read_parquet(summary["trials"])
    assert len(trials) == 2 and trials["trial_id"].is_unique
    assert set(trials["status"]) == {"finished"}
    assert final[lost] != summary["removed_node"]
    assert set(final.values()) <= workers | {summary["replacement_node"]}
    row = trials[trials["trial_dir"].map(lambda p: Path(p).name) == lost].iloc[0]
    assert row["restored_from_step"] > 0 and row["steps"] == 200
    for col in ("l0", "ce_sae", "objective"):
        assert trials[col].notna().all(), col
