"""A restart changes nothing (issue #35): a ladder checkpointed at a logging step, restored
from its bytes and fed its seed's stream from the row it reached ends bit for bit where
the uninterrupted ladder ends, for every kind (the controller, the sparse-step switch, the
dead-feature counters, JumpReLU's calibration and BatchTopK's threshold included)."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from planted import planted_batches
from search_helpers import assert_same_trials

from raysae.activations.batches import iter_activation_batches
from raysae.activations.cache import write_arrays_cache
from raysae.core.config import PenaltyConfig, SAEConfig, TrainConfig
from raysae.core.ladder import LadderTrainer
from raysae.core.training import drive

D_IN, BATCH, STEPS, TARGETS = 16, 64, 90, [4.0, 8.0, 16.0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    rows = torch.cat(list(planted_batches(D_IN, 48, 4, 1000, seed=3, steps=4))).numpy()
    return write_arrays_cache(tmp_path_factory.mktemp("c") / "acts", rows.astype(np.float32),
                              "float32", shard_rows=700, tokens_per_block=50)


def _cfg(case: dict) -> TrainConfig:
    return TrainConfig(sae=SAEConfig(D_IN, 128), lam=0.1, total_tokens=BATCH * STEPS,
                       batch_size=BATCH, lr=3e-3, log_every=10, seed=4,
                       dead_window_tokens=BATCH * 8, **case)


def _stream(cache, cfg, start=0):
    return iter_activation_batches(cache, cfg.batch_size, n_tokens=cfg.total_tokens - start,
                                   seed=cfg.seed, start=start)


CASES = {"sqrt-auto": {"penalty": PenaltyConfig.power(0.5), "control_gain": 0.2},
         "L1-study": {"penalty": PenaltyConfig.power(1.0), "recipe": "study"},
         "panneal": {"kind": "panneal", "penalty": PenaltyConfig.power(0.4)},
         "topk": {"kind": "topk"}, "batchtopk": {"kind": "batchtopk"},
         "jumprelu": {"kind": "jumprelu"}, "matryoshka": {"kind": "matryoshka"}}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("stop_at", [20, 50])
def test_restored_ladder_ends_bit_for_bit_where_the_uninterrupted_one_ends(cache, case,
                                                                          stop_at):
    cfg = _cfg(CASES[case])
    whole = LadderTrainer(cfg, TARGETS)
    drive(whole, _stream(cache, cfg))

    first = LadderTrainer(cfg, TARGETS)
    for x in _stream(cache, cfg):
        first.step(x)
        if first.step_count == stop_at:  # a logging step: where checkpoints are taken
            break
    resumed = LadderTrainer.from_bytes(first.to_bytes(), cfg, TARGETS)
    assert resumed.tokens == stop_at * BATCH
    drive(resumed, _stream(cache, cfg, start=resumed.tokens))

    for name, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    for name in ("lam", "last_fired", "live"):
        assert torch.equal(getattr(resumed, name), getattr(whole, name)), name
    assert resumed.sparse_auto == whole.sparse_auto and resumed.history == whole.history
    if case == "sqrt-auto":  # the CPU sparse step took over at a logging step
        assert whole.sparse_auto
    for a, b in zip(resumed.result(), whole.result(), strict=True):
        assert (a.status, a.steps, a.tokens, a.lam) == (b.status, b.steps, b.tokens, b.lam)


# --- the whole search, interrupted through the CLI and resumed ------------------------------

def _job_args(model, tmp_path):
    """A small search with every stage: references and TopK, 2 proposals stopped at a rung,
    1 promoted, a confirmation on seed 1; a checkpoint at every report (960 steps a trial)."""
    return ["--model", str(model), "--hook", "blocks.0.hook_resid_post", "--context-length",
            "32", "--targets", "4", "8", "--num-trials", "2", "--rung", "0.25", "--promote",
            "1", "--seeds", "2", "--baselines", "topk", "--max-concurrent", "1",
            "--total-tokens", "122880", "--cache-tokens", "122880", "--batch-size", "128",
            "--log-every", "40", "--checkpoint-seconds", "0", "--storage",
            str(tmp_path / "tune"), "--results", str(tmp_path / "results"), "--no-report"]


@pytest.fixture(scope="module")
def uninterrupted_job(tiny_model_dir, ray_local, tmp_path_factory):
    from raysae import cli

    tmp = tmp_path_factory.mktemp("whole")
    assert cli.main(["search", *_job_args(tiny_model_dir, tmp)]) == 0
    return pd.read_parquet(tmp / "results" / "trials.parquet")


def _running_with_checkpoint(experiment) -> float | None:
    """When the first checkpoint of a trial of ``experiment`` that is still training was
    written (None: no such trial)."""
    for trial in experiment.glob("*/"):
        checkpoints = sorted(trial.glob("checkpoint_*"))
        result = trial / "result.json"
        last = result.read_text().splitlines()[-1:] if result.exists() else []
        if checkpoints and last and json.loads(last[0]).get("status") == "running":
            with contextlib.suppress(FileNotFoundError):  # Tune may drop an older one
                return checkpoints[0].stat().st_mtime  # between the listing and now
    return None


def _wait_until_restorable(proc, experiment, timeout=400) -> None:
    """Until a trial of ``experiment`` trains with a checkpoint and the experiment's state
    was saved after it (what a resume restores from)."""
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, f"{experiment.name}: nothing to restore in {timeout} s"
        at = _running_with_checkpoint(experiment)
        states = [f.stat().st_mtime for f in experiment.glob("experiment_state-*.json")]
        if at is not None and states and max(states) > at + 0.2:
            return
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["driver-sigkill", "ctrl-c"])
def test_interrupted_search_resumed_equals_the_uninterrupted_one(fault, tiny_model_dir,
                                                                 ray_local, tmp_path,
                                                                 uninterrupted_job):
    """The driver SIGKILLed while the promoted proposal trains (then its results folder
    deleted, as on a new head: the resume reads the settings and the study from --storage),
    or Ctrl-C while a reference trains; the same command with --resume gives the
    uninterrupted search's trials table, every metric to 1e-6, and the restored rows say
    where they resumed."""
    from test_reliability2 import ENV, ROOT, _kill_if_running

    from raysae import cli

    args = _job_args(tiny_model_dir, tmp_path)
    proc = subprocess.Popen([sys.executable, str(ROOT / "searches" / "exponent_search.py"),
                             *args], cwd=ROOT, env={**ENV, "TUNE_GLOBAL_CHECKPOINT_S": "1"},
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    stage = "promote" if fault == "driver-sigkill" else "refs"
    try:
        _wait_until_restorable(proc, tmp_path / "tune" / f"exponent_search_{stage}")
        os.killpg(proc.pid, signal.SIGKILL if fault == "driver-sigkill" else signal.SIGINT)
        proc.communicate(timeout=120)
        assert proc.returncode == (-9 if fault == "driver-sigkill" else 130)
    finally:
        _kill_if_running(proc)
    assert not (tmp_path / "results" / "trials.parquet").exists()
    if fault == "driver-sigkill":
        shutil.rmtree(tmp_path / "results", ignore_errors=True)

    assert cli.main(["search", *args, "--resume"]) == 0
    trials = pd.read_parquet(tmp_path / "results" / "trials.parquet")
    assert set(trials["stage"]) == {"refs", "search", "promote", "confirm"}
    assert_same_trials(trials, uninterrupted_job)
    restored = trials[trials["restored_from_step"] > 0]
    assert set(restored["stage"]) == {stage}, trials[["stage", "restored_from_step"]]
    assert (restored["restored_from_tokens"] == restored["restored_from_step"] * 128).all()
    import optuna

    from raysae.search.tracking import study_path, study_storage

    study = optuna.load_study(study_name="exponent_search", storage=study_storage(
        study_path(tmp_path / "results", "exponent_search")))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
