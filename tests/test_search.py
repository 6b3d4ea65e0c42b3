"""The search service end to end on the tiny local model: Tune trials, Optuna, results
table, trial restart from checkpoint, divergence, and the main script."""

import dataclasses
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from search_helpers import assert_same_trials, make_plan, make_spec

from raysae.activations.cache import build_cache
from raysae.activations.source import ActivationSource
from raysae.search.config import SearchConfig
from raysae.search.space import SearchSpace, penalty_of, reference_configs
from raysae.search.stages import run_search
from raysae.search.trial.spec import BAD_OBJECTIVE, objective

HOOK = "blocks.0.hook_resid_post"
CTX = 32


@pytest.fixture(scope="module")
def tiny_cache(tiny_model_dir, ray_local, tmp_path_factory):
    src = ActivationSource(
        model=str(tiny_model_dir), hook=HOOK, context_length=CTX, n_tokens=16_384, num_actors=1
    )
    return build_cache(src, tmp_path_factory.mktemp("acts"), progress=False)


def _spec(tiny_model_dir, tiny_cache, **kw):
    base = {
        "activations": str(tiny_cache),
        "model": str(tiny_model_dir),
        "hook": HOOK,
        "d_in": 32,
        "d_sae": 128,
        "context_length": CTX,
        "total_tokens": 512 * 40,
        "batch_size": 512,
        "log_every": 10,
        "checkpoint_seconds": 0,
        "eval_blocks": 8,
        "feature_tokens": 2000,
        "lambda_mode": "search",
    }
    base.update(kw)
    return make_spec(**base)


def test_objective_formula():
    assert objective(5.0, 16.0, 16.0, beta=1.0, tol=0.15) == 5.0
    assert objective(5.0, 18.0, 16.0, beta=1.0, tol=0.15) == 5.0  # inside tolerance
    miss = math.log(32 / 16) - math.log(1.15)
    assert objective(5.0, 32.0, 16.0, beta=2.0, tol=0.15) == pytest.approx(5.0 + 2 * miss)
    assert objective(5.0, 8.0, 16.0, beta=2.0, tol=0.15) == pytest.approx(5.0 + 2 * miss)
    assert objective(float("nan"), 8.0, 16.0, 1.0, 0.15) == BAD_OBJECTIVE
    assert objective(4.0, 100.0, None, 1.0, 0.15) == 4.0


def test_space_is_built_from_the_registry():
    """Each family's searched parameters over their ranges, prefixed by the family; lambda
    only when searched; the references exact (eps = 0) and never proposed by Optuna."""
    search = SearchConfig(
        penalty=("power", "tanh", "log"),
        lambda_mode="search",
        objective="pareto",
        rung=0.0,
        ranges={"power.p": (0.3, 0.9)},
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        SearchSpace(search)(trial)
        family = trial.params["penalty"]
        seen.add(family)
        keys = {k for k in trial.params if k not in ("penalty", "lam")}
        assert keys == {
            f"{family}.{n}"
            for n in {"power": ("p", "eps"), "tanh": ("c",), "log": ("eps",)}[family]
        }
        assert "lam" in trial.params
        if family == "power":
            assert 0.3 <= trial.params["power.p"] <= 0.9
        study.tell(trial, 1.0)
    assert seen == {"power", "tanh", "log"}
    refs = reference_configs()
    assert [penalty_of(r) for r in refs] == [
        ("power", {"p": 1.0, "eps": 0.0}),
        ("power", {"p": 0.5, "eps": 0.0}),
        ("power", {"p": 0.25, "eps": 0.0}),
    ]
    control = SearchSpace(SearchConfig())
    assert [d["name"] for d in control.describe()] == ["power.p", "power.eps"]


def test_each_family_has_its_own_range_flags():
    """--power-eps-range and --log-eps-range reach their own family only (both have an eps);
    the flags come from the registry."""
    from raysae.cli import build_parser
    from raysae.cli.flags import given
    from raysae.search.config import job_config

    args = build_parser().parse_args(
        ["search", "--penalty", "power", "log", "--power-eps-range", "0.01", "0.1",
         "--log-eps-range", "0.5", "1"])
    search = job_config(**{k: v for k, v in given(args).items() if k != "preset"}).search
    assert search.ranges == {"power.eps": (0.01, 0.1), "log.eps": (0.5, 1.0)}
    space = SearchSpace(search).params
    assert ("eps", 0.01, 0.1, True) in space["power"]
    assert ("eps", 0.5, 1.0, True) in space["log"]
    assert ("p", 0.1, 1.0, False) in space["power"]  # not given: the registry's


def test_search_writes_one_row_per_trial_with_metrics(tiny_model_dir, tiny_cache, tmp_path):
    spec = _spec(
        tiny_model_dir,
        tiny_cache,
        threshold_sweep=True,
        sweep_points=4,
        lambda_mode="control",
        targets=(4.0, 8.0, 16.0),
    )
    plan = make_plan("t3", str(tmp_path / "tune"), spec, targets=(4.0, 8.0, 16.0),
                     num_trials=1, seeds=0, baselines=())
    out = run_search(plan, tmp_path / "results")
    trials = pd.read_parquet(out / "trials.parquet")
    assert trials["trial_id"].is_unique  # one row per SAE: (trial, target)
    assert set(trials["status"]) == {"finished"}
    refs = trials[trials["experiment"] == "t3_refs"]
    assert sorted(refs["family"]) == ["L1"] * 3 + ["sqrt"] * 3 + ["sqrt(sqrt)"] * 3
    assert (refs["eps"] == 0).all()  # the study's points, exact
    # Every family has a point at every target of the ladder.
    assert (refs.groupby("family")["target_l0"].apply(sorted) == [[4.0, 8.0, 16.0]] * 3).all()
    searched = trials[trials["experiment"] == "t3_search"]
    assert len(searched) == 3 and (searched["penalty"] == "power").all()
    assert searched["tune_trial_id"].nunique() == 1 and sorted(searched["member"]) == [0, 1, 2]
    # The trial's score is its ladder's mean CE minus L1's (the search's zero point).
    l1 = refs[refs["family"] == "L1"].sort_values("target_l0")["ce_sae"].mean()
    assert searched["trial_objective"].iloc[0] == pytest.approx(
        searched["objective"].mean() - l1, abs=1e-6)
    for col in (
        "l0",
        "ce_sae",
        "ce_clean",
        "ce_zero",
        "ce_recovered",
        "fvu",
        "cos_sim",
        "l2_ratio",
        "dead_fraction",
        "objective",
        "lam",
        "tokens_seen",
    ):
        assert trials[col].notna().all(), col
    assert (trials["tokens_seen"] == 512 * 40).all()
    assert (trials["ce_zero"] > trials["ce_sae"]).all()
    ablations = pd.read_parquet(out / "ablations.parquet")
    assert set(ablations["trial_id"]) == set(trials["trial_id"])  # every member's curve
    assert set(ablations["method"]) == {"global_threshold"}
    assert (out / "feature_stats.parquet").exists() and (out / "search.json").exists()
    # Where the time went: each trial's own phases, and per stage the core-seconds of each
    # against the stage's wall time x slots.
    assert (trials[["setup_seconds", "train_seconds", "eval_seconds"]] > 0).all().all()
    spent = json.loads((out / "search.json").read_text())["provenance"]["core_seconds"]
    assert set(spent) == {"refs", "search", "total"}
    for stage, parts in spent.items():
        assert set(parts) == {"train", "eval", "setup", "outside_trials", "available"}
        inside = parts["train"] + parts["eval"] + parts["setup"]
        assert 0 < inside <= parts["available"] + 0.5, (stage, parts)
        assert parts["outside_trials"] == pytest.approx(parts["available"] - inside, abs=0.5)
    assert spent["total"]["train"] == pytest.approx(
        spent["refs"]["train"] + spent["search"]["train"], abs=0.2)


def test_search_stage_stops_proposals_at_the_rung(tiny_model_dir, tiny_cache, tmp_path):
    """ASHA (promote 0): five proposals one at a time, rung at 1/4 (reduction factor 4): it
    stops the ones outside the best quarter so far; they keep one row with status stopped
    and their rung score (held-out, timed as evaluation), reach Optuna as pruned with it,
    and are never confirmed."""
    from raysae.results.vocabulary import Stage
    from raysae.search.multifidelity import stage_rung_tokens
    from raysae.search.stages import best_configs
    from raysae.search.tracking import study_path, study_storage
    from raysae.search.trials_table import results_frame
    from raysae.search.tune_setup import make_tuner

    spec = _spec(tiny_model_dir, tiny_cache, lambda_mode="control", targets=(8.0,),
                 reference_ce=(5.0,))
    plan = make_plan("r5", str(tmp_path / "tune"), spec, targets=(8.0,), num_trials=5,
                     seeds=0, baselines=(), rung=0.25, promote=0, max_concurrent=1)
    plan = dataclasses.replace(plan, results=str(tmp_path / "results"))
    spec = dataclasses.replace(spec, rung_tokens=stage_rung_tokens(plan.search, 512 * 40, 512))
    grid = make_tuner(plan, Stage.SEARCH, spec, (), 1, resume=False).fit()
    searched = results_frame(grid, "r5_search").assign(stage="search")
    assert len(searched) == 5 and set(searched["status"]) <= {"finished", "stopped"}
    stopped = searched[searched["status"] == "stopped"]
    finished = searched[searched["status"] == "finished"]
    assert len(stopped) >= 1 and len(finished) >= 1
    assert searched["rung_objective"].notna().all() and (searched["rung_tokens"] == 5120).all()
    assert (stopped["tokens_seen"] < 512 * 40).all()
    assert (finished["tokens_seen"] == 512 * 40).all()
    assert (stopped["eval_seconds"] > 0).all() and (stopped["train_seconds"] > 0).all()
    # A stopped proposal was worse at the rung than the best one scored before it.
    # run_trial_<random hex id>_<creation index>_<params>_<date>: order by the index.
    created = searched["trial_dir"].map(
        lambda d: int(re.match(r"[^_]+_[^_]+_[0-9a-f]+_(\d+)_", os.path.basename(d)).group(1)))
    order = searched.assign(created=created).sort_values("created")
    assert sorted(order["created"]) == [1, 2, 3, 4, 5]
    for i, row in enumerate(order.itertuples()):
        if row.status == "stopped":
            assert row.rung_objective > order["rung_objective"].iloc[:i].min()
    assert len(best_configs(plan, searched, 5)) == len(finished)
    study = optuna.load_study(study_name="r5", storage=study_storage(
        study_path(plan.results, "r5")))
    states = sorted(t.state.name for t in study.trials)
    assert states == sorted(["PRUNED"] * len(stopped) + ["COMPLETE"] * len(finished))
    assert all(len(t.intermediate_values) == 1 for t in study.trials)


def test_successive_halving_trains_the_best_at_the_rung_to_the_end(tiny_model_dir, tiny_cache,
                                                                   tmp_path, capsys):
    """The default policy (``promote`` K): all five proposals end at the rung (status
    stopped, scored there, at the step that reaches it (step 6 of 40, between logging steps
    10 and 20): the tokens recorded are the tokens seen; Optuna takes the rung score as
    their value), the K = 2 best there
    are retrained to the full budget in stage ``promote`` (seed 0, the same trajectory up
    to the rung), and the better of those is the one the confirmation retrains, judged on
    its fresh seed only."""
    from raysae.search.tracking import study_path, study_storage

    spec = _spec(tiny_model_dir, tiny_cache, lambda_mode="control", targets=(8.0,))
    plan = make_plan("h5", str(tmp_path / "tune"), spec, targets=(8.0,), num_trials=5,
                     seeds=2, confirm_best=1, baselines=(), rung=0.15, promote=2)
    plan = dataclasses.replace(plan, results=str(tmp_path / "results"))
    out = run_search(plan, tmp_path / "results")
    trials = pd.read_parquet(out / "trials.parquet")
    searched = trials[trials["stage"] == "search"]
    assert len(searched) == 5 and set(searched["status"]) == {"stopped"}
    assert (searched["rung_tokens"] == 6 * 512).all() and searched["rung_objective"].notna().all()
    assert (searched["tokens_seen"] == searched["rung_tokens"]).all()
    promoted = trials[trials["stage"] == "promote"]
    assert set(promoted["status"]) == {"finished"} and (promoted["tokens_seen"] == 512 * 40).all()
    best_at_rung = searched.nsmallest(2, "rung_objective")
    assert sorted(promoted["label"]) == sorted(best_at_rung["label"])
    winner = promoted.nsmallest(1, "trial_objective")["label"].iloc[0]
    confirmed = trials[trials["stage"] == "confirm"]
    assert set(confirmed["seed"]) == {1}
    assert set(confirmed["label"]) - {"L1", "sqrt", "sqrt(sqrt)"} == {winner}
    study = optuna.load_study(study_name="h5", storage=study_storage(
        study_path(plan.results, "h5")))
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 5
    assert sorted(t.value for t in study.trials) == pytest.approx(
        sorted(searched["rung_objective"]))
    comparisons = pd.read_parquet(out / "comparisons.parquet")
    mine = comparisons[comparisons["label"] == winner]
    assert len(mine) and mine["fresh_seeds_only"].all() and (mine["n_seeds"] == 1).all()
    spent = json.loads((out / "search.json").read_text())["provenance"]["core_seconds"]
    assert {"search", "promote", "confirm"} <= set(spent)
    # `raysae export` on a halving search's results: the stopped proposals keep no SAE
    from raysae import cli

    assert cli.main(["export", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"exported {len(trials) - 5} SAEs" in printed
    assert "skipped 5 proposals stopped at their rung" in printed


def _restart_plan(tiny_model_dir, tiny_cache, storage, every, **fault):
    """A 40-step control ladder checkpointed by wall time: every report (0 s) or only the
    final one (an hour); ``fault``: where and how it fails once."""
    spec = _spec(tiny_model_dir, tiny_cache, lambda_mode="control", targets=(4.0, 8.0),
                 checkpoint_seconds=every, **fault)
    return make_plan("restart", str(storage), spec, grid=({"p": 0.5, "eps": 0.0},),
                     targets=(4.0, 8.0), max_failures=1)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tiny_cache, tmp_path_factory):
    """The restart test's trial, never interrupted."""
    tmp = tmp_path_factory.mktemp("whole")
    out = run_search(_restart_plan(tiny_model_dir, tiny_cache, tmp / "tune", 0), tmp / "r")
    return pd.read_parquet(out / "trials.parquet")


@pytest.mark.parametrize(("kind", "every", "restored"),
                         [("raise", 0, 30), ("sigkill", 0, 30), ("raise", 3600, 0)])
def test_failed_trial_resumes_from_checkpoint_with_same_step_count(
    tiny_model_dir, tiny_cache, tmp_path, kind, every, restored, uninterrupted
):
    """An exception, or the trial's worker process killed by SIGKILL, mid-training: the
    trial continues from its last checkpoint on its seed's stream, and ends with exactly the
    uninterrupted trial's results (issue #35)."""
    started = time.time()
    # Reports at steps 10, 20, 30, 40; the failure comes at 30 (after that report).
    plan = _restart_plan(tiny_model_dir, tiny_cache, tmp_path / "tune", every,
                         inject_failure_at_step=25, inject_failure_kind=kind)
    trials = pd.read_parquet(run_search(plan, tmp_path / "r") / "trials.parquet")
    assert len(trials) == 2  # one row per ladder member, not two per restart
    assert set(trials["status"]) == {"finished"} and set(trials["steps"]) == {40}
    # Every member resumed from the last checkpoint before the failure, and says so.
    assert set(trials["restored_from_step"]) == {restored}
    assert set(trials["restored_from_tokens"]) == {restored * 512}
    assert_same_trials(trials, uninterrupted)
    assert (trials["checkpoint_bytes"] > 0).all()  # this attempt's, final checkpoint included
    assert sorted(trials["target_l0"]) == [4.0, 8.0]
    # Checkpoint scratch folders live in the node's raysae cache (a killed worker's is
    # removed when the trial restarts), never in Tune's folders or the system temp folder.
    from raysae.search.trial.scratch import CKPT_PREFIX, scratch_root

    assert not list((tmp_path / "tune").rglob(CKPT_PREFIX + "*"))  # Tune would upload them
    for trial_id in trials["tune_trial_id"]:  # the node's scratch, cleaned after the stage
        assert not list((scratch_root() / trial_id).glob(CKPT_PREFIX + "*"))
    temp = Path(tempfile.gettempdir())
    stray = [*temp.glob(CKPT_PREFIX.lstrip(".") + "*"), *temp.glob(CKPT_PREFIX + "*")]
    assert not [d for d in stray if d.stat().st_mtime >= started]


def test_diverging_trial_is_reported_not_crashed(tiny_model_dir, tiny_cache, tmp_path):
    spec = _spec(tiny_model_dir, tiny_cache, lr=1e12, lambda_mode="fixed")
    settings = make_plan(
        "div", str(tmp_path / "tune"), spec, grid=({"p": 0.5, "eps": 0.0, "lam": 1.0},)
    )
    row = pd.read_parquet(run_search(settings, tmp_path / "r") / "trials.parquet").iloc[0]
    assert row["status"] == "diverged" and row["objective"] == BAD_OBJECTIVE


def test_bad_settings_fail_before_any_work(tiny_model_dir, tiny_cache):
    spec = _spec(tiny_model_dir, tiny_cache)
    with pytest.raises(ValueError, match=r"targets 200 .*d_sae = 128"):
        make_plan("x", "st", spec, targets=(200.0,))
    with pytest.raises(ValueError, match="num_trials 0 is invalid"):
        make_plan("x", "st", spec, num_trials=0)
    with pytest.raises(ValueError, match="lambda_mode 'control' needs targets"):
        _spec(tiny_model_dir, tiny_cache, lambda_mode="control")


def test_live_streaming_search_on_two_cpus_does_not_deadlock(tiny_model_dir, ray_local, tmp_path):
    source = ActivationSource(
        model=str(tiny_model_dir), hook=HOOK, context_length=CTX, n_tokens=8192
    )
    spec = _spec(
        tiny_model_dir,
        str(tmp_path),
        activations=dataclasses.asdict(source),
        total_tokens=512 * 12,
        lambda_mode="fixed",
    )
    settings = make_plan(
        "live",
        str(tmp_path / "tune"),
        spec,
        grid=({"p": 1.0, "lam": 1.0}, {"p": 0.5, "eps": 0.0, "lam": 1.0}),
        cpus_per_trial=0.5,
        max_concurrent=1,
    )
    trials = pd.read_parquet(run_search(settings, tmp_path / "r") / "trials.parquet")
    assert len(trials) == 2 and set(trials["status"]) == {"finished"}
    assert (trials["tokens_seen"] == 512 * 12).all()


def test_reports_by_wall_time_change_what_tune_hears_not_what_is_trained(
        tiny_model_dir, tiny_cache, tmp_path, uninterrupted):
    """``report_seconds``: an hour between reports leaves Tune the first and the final ones
    (every logging step's metrics stay in the trainer's history), and the trained SAEs are
    the uninterrupted restart test's, which reported at every logging step."""
    plan = _restart_plan(tiny_model_dir, tiny_cache, tmp_path / "tune", 0)
    plan = dataclasses.replace(plan, spec=dataclasses.replace(
        plan.spec, run=dataclasses.replace(plan.spec.run, report_seconds=3600.0,
                                           checkpoint_seconds=3600.0)))
    trials = pd.read_parquet(run_search(plan, tmp_path / "r") / "trials.parquet")
    assert_same_trials(trials, uninterrupted)
    (result,) = (tmp_path / "tune" / "restart").glob("*/result.json")
    assert len(result.read_text().splitlines()) == 2  # the first logging step and the end
