"""Resume: the driver killed (SIGKILL) mid-search, then the same command with --resume,
ends with exactly the requested number of distinct, finished trials."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from raysae import cli
from raysae.core.kinds import KINDS, default_baselines
from raysae.core.penalties import reference_points

ROOT = Path(__file__).resolve().parents[1]


def _args(tiny_model_dir, tmp_path, n_trials):
    return ["--model", str(tiny_model_dir), "--hook", "blocks.0.hook_resid_post",
            "--context-length", "32", "--targets", "8", "--num-trials", str(n_trials),
            "--seeds", "0",
            "--max-concurrent", "1", "--total-tokens", "30720", "--cache-tokens", "16384",
            "--storage", str(tmp_path / "tune"), "--results", str(tmp_path / "results"),
            "--no-report"]


def _finished_trials(storage: Path) -> int:
    done = 0
    for result in storage.glob("*/*/result.json"):
        lines = result.read_text().splitlines()
        if lines and json.loads(lines[-1]).get("status") == "finished":
            done += 1
    return done


@pytest.mark.slow  # 86 s on 2 cores: a search killed mid-stage, then resumed
def test_killed_search_resumes_without_lost_or_duplicated_trials(tiny_model_dir, ray_local,
                                                                 tmp_path):
    args = _args(tiny_model_dir, tmp_path, n_trials=1)
    env = {**os.environ, "RAY_ADDRESS": "", "RAYSAE_RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, str(ROOT / "searches" / "exponent_search.py"),
                             *args], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while _finished_trials(tmp_path / "tune") < 2 and time.time() < deadline:
            assert proc.poll() is None, "the search ended before it could be killed"
            time.sleep(0.5)
        assert _finished_trials(tmp_path / "tune") >= 2
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "results" / "trials.parquet").exists()

    assert cli.main(["search", *([*args, "--resume"])]) == 0
    trials = pd.read_parquet(tmp_path / "results" / "trials.parquet")
    # The references and the default baselines (the registry's) ran once each, and Optuna's
    # one trial once, not again after the restore.
    fixed = ([label for label, _name, _params in reference_points()]
             + [KINDS[name].label for name in default_baselines()])
    assert len(trials) == len(fixed) + 1 and trials["trial_id"].is_unique
    assert set(trials["status"]) == {"finished"}
    assert sorted(trials["family"]) == sorted([*fixed, "power"])
