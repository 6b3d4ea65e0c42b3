"""The search service end to end on the tiny local model: Tune trials, Optuna, results
table, trial restart from checkpoint, divergence, and the main script."""

import dataclasses
import math

import optuna
import pandas as pd
import pytest

from raysae.activations.cache import build_cache
from raysae.activations.source import ActivationSource
from raysae.search.trainable import BAD_OBJECTIVE, TrialSpec, objective
from raysae.search.tune_setup import SearchSettings, SearchSpace, run_search, seed_points

HOOK = "blocks.0.hook_resid_post"
CTX = 32


@pytest.fixture(scope="module")
def tiny_cache(tiny_model_dir, ray_local, tmp_path_factory):
    src = ActivationSource(model=str(tiny_model_dir), hook=HOOK, context_length=CTX,
                           n_tokens=16_384, num_actors=1)
    return build_cache(src, tmp_path_factory.mktemp("acts"), progress=False)


def _spec(tiny_model_dir, tiny_cache, **kw):
    base = {"activations": str(tiny_cache), "model": str(tiny_model_dir), "hook": HOOK,
            "d_in": 32, "d_sae": 128, "context_length": CTX, "total_tokens": 512 * 40,
            "batch_size": 512, "report_every": 10, "checkpoint_every": 1, "eval_blocks": 8,
            "feature_tokens": 2000, "lambda_mode": "search"}
    base.update(kw)
    return TrialSpec(**base)


def test_objective_formula():
    assert objective(5.0, 16.0, 16.0, beta=1.0, tol=0.15) == 5.0
    assert objective(5.0, 18.0, 16.0, beta=1.0, tol=0.15) == 5.0  # inside tolerance
    miss = math.log(32 / 16) - math.log(1.15)
    assert objective(5.0, 32.0, 16.0, beta=2.0, tol=0.15) == pytest.approx(5.0 + 2 * miss)
    assert objective(5.0, 8.0, 16.0, beta=2.0, tol=0.15) == pytest.approx(5.0 + 2 * miss)
    assert objective(float("nan"), 8.0, 16.0, 1.0, 0.15) == BAD_OBJECTIVE
    assert objective(4.0, 100.0, None, 1.0, 0.15) == 4.0


def test_space_suggests_s_only_below_p1_and_lambda_only_when_searched():
    settings = SearchSettings(spec=None)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for point in seed_points(settings):
        study.enqueue_trial(point)
    for _ in range(10):
        trial = study.ask()
        SearchSpace(settings)(trial)
        assert ("s" in trial.params) == (trial.params["p"] < 1.0)
        assert "lam" in trial.params
        study.tell(trial, 1.0)
    assert [t.params["p"] for t in study.trials[:3]] == [1.0, 0.5, 0.25]
    assert [t.params.get("s") for t in study.trials[:3]] == [None, 1.0, 1.0]


def test_search_writes_one_row_per_trial_with_metrics(tiny_model_dir, tiny_cache, tmp_path):
    spec = _spec(tiny_model_dir, tiny_cache, threshold_sweep=True, sweep_points=4)
    settings = SearchSettings(name="t3", storage=str(tmp_path / "tune"), targets=(8.0,),
                              num_trials=3, lam_range=(0.1, 10.0), spec=spec)
    out = run_search(settings, tmp_path / "results")
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 3 and trials["trial_id"].is_unique
    assert set(trials["status"]) == {"finished"}
    assert sorted(trials["family"]) == ["L1", "sqrt", "sqrt(sqrt)"]  # the study's seeds
    for col in ("l0", "ce_sae", "ce_clean", "ce_zero", "ce_recovered", "fvu", "cos_sim",
                "l2_ratio", "dead_fraction", "objective", "lam", "tokens_seen"):
        assert trials[col].notna().all(), col
    assert (trials["tokens_seen"] == 512 * 40).all()
    assert (trials["ce_zero"] > trials["ce_sae"]).all()
    ablations = pd.read_parquet(out / "ablations.parquet")
    assert set(ablations["trial_id"]) == set(trials["trial_id"])
    assert set(ablations["method"]) == {"global_threshold"}
    assert (out / "feature_stats.parquet").exists() and (out / "search.json").exists()


@pytest.mark.parametrize("kind", ["raise", "sigkill"])
def test_failed_trial_resumes_from_checkpoint_with_same_step_count(
        tiny_model_dir, tiny_cache, tmp_path, kind):
    """An exception, or the trial's worker process killed by SIGKILL, mid-training."""
    # Reports at steps 10, 20, 30, 40; checkpoints at 20 and 40; the failure comes at 30.
    spec = _spec(tiny_model_dir, tiny_cache, inject_failure_at_step=25, lambda_mode="fixed",
                 checkpoint_every=2, inject_failure_kind=kind)
    settings = SearchSettings(name="restart", storage=str(tmp_path / "tune"), objective="grid",
                              grid=({"p": 0.5, "s": 1.0, "lam": 1.0},), max_failures=1,
                              spec=spec)
    trials = pd.read_parquet(run_search(settings, tmp_path / "r") / "trials.parquet")
    assert len(trials) == 1  # the restarted trial is one row, not two
    row = trials.iloc[0]
    assert row["status"] == "finished" and row["steps"] == 40
    assert row["restored_from_step"] == 20  # the last checkpoint before the failure


def test_diverging_trial_is_reported_not_crashed(tiny_model_dir, tiny_cache, tmp_path):
    spec = _spec(tiny_model_dir, tiny_cache, lr=1e12, lambda_mode="fixed")
    settings = SearchSettings(name="div", storage=str(tmp_path / "tune"), objective="grid",
                              grid=({"p": 0.5, "s": 1.0, "lam": 1.0},), spec=spec)
    row = pd.read_parquet(run_search(settings, tmp_path / "r") / "trials.parquet").iloc[0]
    assert row["status"] == "diverged" and row["objective"] == BAD_OBJECTIVE


def test_bad_settings_fail_before_any_work(tiny_model_dir, tiny_cache):
    spec = _spec(tiny_model_dir, tiny_cache)
    with pytest.raises(ValueError, match=r"target L0 200.* d_sae=128"):
        SearchSettings(targets=(200.0,), spec=spec)
    with pytest.raises(ValueError, match="num_trials = 0"):
        SearchSettings(num_trials=0, spec=spec)
    with pytest.raises(ValueError, match="lambda_mode 'control' needs target_l0"):
        _spec(tiny_model_dir, tiny_cache, lambda_mode="control")


def test_live_concurrency_leaves_room_for_harvest_actors():
    from raysae.search.tune_setup import live_concurrency

    assert live_concurrency(2, 4) == 1  # 2 CPUs: one trial (0.5) + its actor (1)
    assert live_concurrency(16, 4) == 4
    assert live_concurrency(16, 20) == 10
    assert live_concurrency(1, 4) == 1


def test_live_streaming_search_on_two_cpus_does_not_deadlock(tiny_model_dir, ray_local,
                                                             tmp_path):
    source = ActivationSource(model=str(tiny_model_dir), hook=HOOK, context_length=CTX,
                              n_tokens=8192)
    spec = _spec(tiny_model_dir, str(tmp_path), activations=dataclasses.asdict(source),
                 total_tokens=512 * 12, lambda_mode="fixed")
    settings = SearchSettings(name="live", storage=str(tmp_path / "tune"), objective="grid",
                              grid=({"p": 1.0, "lam": 1.0}, {"p": 0.5, "s": 1.0, "lam": 1.0}),
                              cpus_per_trial=0.5, max_concurrent=1, spec=spec)
    trials = pd.read_parquet(run_search(settings, tmp_path / "r") / "trials.parquet")
    assert len(trials) == 2 and set(trials["status"]) == {"finished"}
    assert (trials["tokens_seen"] == 512 * 12).all()
