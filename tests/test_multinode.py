"""Multi-node rehearsal: a head and two worker nodes (ray.cluster_utils.Cluster); the two
trials of a search run on different nodes; one worker is removed mid-search and the search
still ends with a complete table (the lost trial restarts from its checkpoint elsewhere),
equal to the same search's with no node lost.

The cluster lives in a subprocess (one Ray runtime per process; the session's ``ray_local``
may be running here) with its own RAY_TMPDIR, so its address file and session folders are
private, and the test checks that none of its Ray processes outlive it."""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from isolated import run_rehearsal
from search_helpers import assert_same_trials

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


def _run_rehearsal(model_dir: Path, workdir: Path, ray_tmp: Path) -> tuple[dict, str]:
    summary = workdir / "summary.json"
    cmd = [sys.executable, str(ROOT / "tests" / "cluster_rehearsal.py"), "--model",
           str(model_dir), "--workdir", str(workdir), "--summary", str(summary)]
    code, output, left = run_rehearsal(cmd, ray_tmp, TIMEOUT_S)
    assert code == 0, output[-6000:]
    assert not left, f"Ray processes of the rehearsal outlived it: {left}"
    return json.loads(summary.read_text()), output


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
    # and its numbers are the uninterrupted search's (issue #35)
    assert_same_trials(trials, pd.read_parquet(summary["uninterrupted_trials"]))
    for col in ("l0", "ce_sae", "objective"):
        assert trials[col].notna().all(), col
