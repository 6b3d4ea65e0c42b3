"""Multi-fidelity search stages (the driver side). Each proposal's ladder is scored at its
rung (a fraction of the token budget, ``SearchConfig.rung``; the trial's side is
raysae.search.trial.rungs), and one of two policies (``rung_policy``) stops it:
successive halving (``promote`` K > 0: every proposal ends at the rung, Optuna takes the rung
score as its value, and the stages train the K best to the full budget) or Ray Tune's ASHA
(K = 0: a proposal goes on unless its score is outside the best seen there; Optuna hears the
rung score of a stopped one as PRUNED, so TPE learns from it too).

References and confirmations are never stopped.
"""

from __future__ import annotations

import math

from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from raysae.search.tracking import mirror_study
from raysae.search.trial.rungs import RUNG_METRIC, RUNG_TIME

HALVING, ASHA, NO_RUNG = "halving", "asha", "none"


def rung_policy(search) -> str:
    """How the search stage's proposals stop (SearchConfig.rung, .promote): NO_RUNG when
    there is no rung or no more proposals than ``promote`` (all would go on)."""
    if not search.rung or (search.promote and search.num_trials <= search.promote):
        return NO_RUNG
    return HALVING if search.promote else ASHA


class RungOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna a trial's rung scores as intermediate values (step:
    tokens) and a trial stopped at a rung as PRUNED, or, with ``rung_is_final`` (successive
    halving, where every proposal ends there), COMPLETE with its rung score. Tune's own class
    reports every training report's NaN objective and tells a stopped trial COMPLETE with
    NaN, which Optuna records as FAIL and TPE ignores; a PRUNED trial TPE ranks behind every
    complete one by its last intermediate value."""

    def __init__(self, *args, rung_is_final: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rung_is_final, self._told = rung_is_final, set()

    def _tell(self, trial_id: str, result: dict) -> None:
        """The rung score as an intermediate value, once per (trial, step)."""
        key = (trial_id, int(result[RUNG_TIME]))
        if (isinstance(self.metric, str) and trial_id in self._ot_trials and key not in self._told
                and trial_id not in self._completed_trials):
            self._told.add(key)
            self._ot_trials[trial_id].report(float(result[RUNG_METRIC]), key[1])

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if _finite(result.get(RUNG_METRIC)):
            self._tell(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        final = (result or {}).get(self.metric) if isinstance(self.metric, str) else None
        if result and not error and _finite(result.get(RUNG_METRIC)) and not _finite(final):
            self._tell(trial_id, result)  # Tune hands a stopping report only to this method
            result = ({**result, self.metric: float(result[RUNG_METRIC])} if self.rung_is_final
                      else {k: v for k, v in result.items() if k != self.metric})  # PRUNED
        super().on_trial_complete(trial_id, result, error)
        mirror_study(self._ot_study)

    def save(self, checkpoint_path: str) -> None:
        """Tune's experiment checkpoint of the searcher (its study in memory, in --storage
        with the experiment); the journal is written out with it (raysae.search.tracking)."""
        super().save(checkpoint_path)
        mirror_study(self._ot_study)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def rung_scheduler(search, spec) -> ASHAScheduler | None:
    """ASHA for a stage whose trials score a rung (``spec.rung_tokens``) under the ASHA
    policy: grace period at the rung's tokens and reduction factor 1 / rung, so a proposal
    continues only when its score is in the best 1 / rung of those scored there so far
    (the first one always does); None otherwise."""
    rung = search.rung
    if rung_policy(search) != ASHA or not spec.rung_tokens:
        return None
    total, batch = spec.train.total_tokens, spec.train.batch_size
    return ASHAScheduler(time_attr=RUNG_TIME, metric=RUNG_METRIC, mode="min", max_t=total,
                         grace_period=rung_tokens(rung, total, batch), reduction_factor=1 / rung,
                         stop_last_trials=False)


def rung_tokens(fraction: float, total_tokens: int, batch_size: int) -> int:
    """The token count of a rung at ``fraction`` of the budget: the end of the first step at
    or after it, so the tokens a rung records are the tokens its ladder has seen."""
    steps = max(math.ceil(round(fraction * total_tokens, 6) / batch_size), 1)
    return steps * batch_size


def stage_rung_tokens(search, total_tokens: int, batch_size: int) -> tuple[int, ...]:
    """The search stage's rungs: ``search.rung`` (unless the policy is NO_RUNG) and
    ``search.rung_trace``."""
    rung = search.rung if rung_policy(search) != NO_RUNG else 0
    fractions = sorted({f for f in (rung, *search.rung_trace) if f})
    return tuple(sorted({rung_tokens(f, total_tokens, batch_size) for f in fractions}))


def halving_stop(search, total_tokens: int, batch_size: int) -> int:
    """Under successive halving, the tokens at which every proposal ends (its rung scored);
    0 otherwise (TrialSpec.stop_tokens)."""
    if rung_policy(search) != HALVING:
        return 0
    return rung_tokens(search.rung, total_tokens, batch_size)
