"""Multi-fidelity search stages: the settings, the ASHA scheduler, and Optuna hearing a
stopped proposal as pruned with its rung score (the search stage end to end:
tests/test_search.py::test_search_stage_stops_proposals_at_the_rung)."""

import dataclasses
import math

import optuna
import pytest
from search_helpers import make_spec

from raysae.search.config import SearchConfig
from raysae.search.multifidelity import (
    ASHA,
    HALVING,
    NO_RUNG,
    RUNG_METRIC,
    RungOptunaSearch,
    halving_stop,
    rung_policy,
    rung_scheduler,
    stage_rung_tokens,
)
from raysae.search.space import SearchSpace
from raysae.settings import SettingError


def test_rung_settings_are_checked_and_give_the_stage_its_rungs():
    with pytest.raises(SettingError, match="rung"):
        SearchConfig(rung=0.7)
    with pytest.raises(SettingError, match="rung_trace"):
        SearchConfig(rung_trace=(1.0,))
    with pytest.raises(SettingError, match="pareto"):
        SearchConfig(rung=0.125, objective="pareto", lambda_mode="search")
    search = SearchConfig(rung=0.125, rung_trace=(0.5, 0.0625))
    # the end of the first step at or after each fraction (batch 512): what the ladder sees
    assert stage_rung_tokens(search, 500_000, 512) == (62 * 512, 123 * 512, 489 * 512)
    assert stage_rung_tokens(search, 500_000, 250) == (31_250, 62_500, 250_000)
    assert stage_rung_tokens(SearchConfig(rung=0.0), 500_000, 512) == ()


def test_asha_is_built_only_for_a_stage_with_rungs():
    spec = make_spec(activations="unused", model="unused", d_in=8, d_sae=32,
                     total_tokens=80_000, lambda_mode="control",
                     targets=(8.0,), rung_tokens=(10_000,))
    asha_search = SearchConfig(rung=0.125, promote=0)
    asha = rung_scheduler(asha_search, spec)
    assert [m for m, _ in asha._brackets[0]._rungs][-1] == 20 * 512  # the first milestone
    assert asha._reduction_factor == 8 and asha._time_attr == "tokens_seen"
    assert asha._max_t == 80_000 and asha._metric == RUNG_METRIC
    assert rung_scheduler(SearchConfig(rung=0.0, promote=0), spec) is None  # off
    assert rung_scheduler(asha_search, dataclasses.replace(spec, rung_tokens=())) is None  # refs
    assert rung_scheduler(SearchConfig(rung=0.125), spec) is None  # halving: no scheduler


def test_the_policy_follows_rung_and_promote():
    """Halving by default; ASHA with promote 0; no rung when it is 0 or when no more
    proposals than promote would be tried (all would go on); halving stops every proposal
    at the rung's tokens, the other policies none."""
    assert rung_policy(SearchConfig()) == HALVING
    assert rung_policy(SearchConfig(promote=0)) == ASHA
    assert rung_policy(SearchConfig(rung=0.0)) == NO_RUNG
    assert rung_policy(SearchConfig(num_trials=2, promote=2)) == NO_RUNG
    assert halving_stop(SearchConfig(rung=0.125), 80_000, 1000) == 10_000
    assert halving_stop(SearchConfig(rung=0.125), 80_000, 3000) == 12_000
    assert halving_stop(SearchConfig(rung=0.125, promote=0), 80_000, 1000) == 0
    assert stage_rung_tokens(SearchConfig(num_trials=1), 80_000, 1000) == ()
    with pytest.raises(SettingError, match="promote"):
        SearchConfig(promote=-1)


def test_optuna_hears_a_stopped_proposal_as_pruned_with_its_rung_score():
    search = SearchConfig(num_trials=2)
    searcher = RungOptunaSearch(SearchSpace(search), metric="objective", mode="min",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for trial_id in ("a", "b"):
        assert searcher.suggest(trial_id)
    running = {"objective": math.nan, "tokens_seen": 100, "training_iteration": 1}
    for trial_id in ("a", "b"):
        searcher.on_trial_result(trial_id, running)  # a training report: nothing told
    # Tune hands the report that made ASHA stop "a" to on_trial_complete only.
    searcher.on_trial_complete("a", {**running, RUNG_METRIC: 0.2, "tokens_seen": 125})
    searcher.on_trial_result("b", {**running, "tokens_seen": 125, RUNG_METRIC: -0.1})
    searcher.on_trial_complete("b", {"objective": -0.15, "tokens_seen": 1000})
    trials = searcher._ot_study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [optuna.trial.TrialState.PRUNED,
                                         optuna.trial.TrialState.COMPLETE]
    assert trials[0].intermediate_values == {125: 0.2}
    assert trials[1].intermediate_values == {125: -0.1} and trials[1].value == -0.15


def test_under_halving_optuna_takes_the_rung_score_as_the_value_told_once():
    """A halving proposal ends on the report that scored its rung: Tune hands that report
    to on_trial_result and again to on_trial_complete; Optuna gets one intermediate value
    and the trial COMPLETE with the rung score (so TPE and GP model it)."""
    searcher = RungOptunaSearch(SearchSpace(SearchConfig()), metric="objective", mode="min",
                                sampler=optuna.samplers.RandomSampler(seed=0),
                                rung_is_final=True)
    assert searcher.suggest("a")
    scored = {"objective": math.nan, "tokens_seen": 125, RUNG_METRIC: 0.3,
              "training_iteration": 2}
    searcher.on_trial_result("a", scored)
    searcher.on_trial_complete("a", scored)
    (trial,) = searcher._ot_study.get_trials(deepcopy=False)
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 0.3
    assert trial.intermediate_values == {125: 0.3}


@pytest.mark.parametrize(("name", "cls"), [("tpe", optuna.samplers.TPESampler),
                                           ("gp", optuna.samplers.GPSampler),
                                           ("qmc", optuna.samplers.QMCSampler)])
def test_each_sampler_proposes_in_the_registry_space_and_learns_from_pruned(name, cls):
    """Every --sampler drives the search space past its start-up, with pruned proposals
    (stopped at a rung) in the study as a search with rungs leaves them."""
    from raysae.search.tune_setup import make_sampler, startup_trials

    search = SearchConfig(num_trials=12, sampler=name)
    sampler = make_sampler(search, seed=0)
    assert isinstance(sampler, cls) and startup_trials(12) == 4 and startup_trials(3) == 2
    space = SearchSpace(search)
    study = optuna.create_study(sampler=sampler)
    for i in range(8):
        trial = study.ask()
        space(trial)
        p = trial.params["power.p"]
        if i % 2:  # stopped at a rung: pruned with its rung score
            trial.report(abs(p - 0.5) + 0.1, 100)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, abs(p - 0.5))
    assert len(study.trials) == 8 and len({t.params["power.p"] for t in study.trials}) == 8
    with pytest.raises(SettingError, match="sampler"):
        SearchConfig(sampler="random")
