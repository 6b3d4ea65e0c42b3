"""Multi-fidelity search stages: Ray Tune's ASHA stops a proposal at its rung (a fraction of
the token budget, ``SearchConfig.rung``) unless its held-out score there is among the best,
and Optuna hears of every rung score, so TPE learns from stopped proposals too.

A trial scores its ladder at a rung with the search's own objective on held-out text
(``RungScorer``, in the trial); references and confirmations are never stopped.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from raysae.search.members import heldout, rung_score

if TYPE_CHECKING:
    from raysae.core.config import TrainConfig
    from raysae.core.ladder import LadderTrainer
    from raysae.search.spec import TrialSpec

RUNG_METRIC, RUNG_TIME = "rung_objective", "tokens_seen"
"""What a rung report carries and ASHA compares, and the report's clock."""


class RungOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna a trial's rung scores as intermediate values (step:
    tokens) and a trial stopped at a rung as PRUNED. Tune's own class reports every training
    report's NaN objective and tells a stopped trial COMPLETE with NaN, which Optuna records
    as FAIL and TPE ignores; a PRUNED trial TPE ranks behind every complete one by its last
    intermediate value."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        value = result.get(RUNG_METRIC)
        if (isinstance(self.metric, str) and trial_id in self._ot_trials
                and trial_id not in self._completed_trials and _finite(value)):
            self._ot_trials[trial_id].report(float(value), int(result[RUNG_TIME]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        final = (result or {}).get(self.metric) if isinstance(self.metric, str) else None
        if result and not error and _finite(result.get(RUNG_METRIC)) and not _finite(final):
            # Tune hands the report that stopped the trial only to on_trial_complete.
            trial = self._ot_trials.get(trial_id)
            if trial is not None and trial_id not in self._completed_trials:
                trial.report(float(result[RUNG_METRIC]), int(result[RUNG_TIME]))
            result = {k: v for k, v in result.items() if k != self.metric}  # -> PRUNED
        super().on_trial_complete(trial_id, result, error)


def unscored(spec) -> dict[str, float]:
    """What every report of a stage with rungs carries before its rung's score: ASHA makes
    Tune check that each report has its metric, so NaN (ASHA and RungOptunaSearch skip
    non-finite values); nothing in a stage without rungs."""
    return {RUNG_METRIC: math.nan} if spec.rung_tokens else {}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def rung_scheduler(rung: float, spec) -> ASHAScheduler | None:
    """ASHA for a stage whose trials score a rung (``spec.rung_tokens``) when ``rung`` is
    set: grace period at the rung's tokens and reduction factor 1 / rung, so a proposal
    continues only when its score is in the best 1 / rung of those scored there so far
    (the first one always does); None otherwise."""
    if not rung or not spec.rung_tokens:
        return None
    total = spec.train.total_tokens
    return ASHAScheduler(time_attr=RUNG_TIME, metric=RUNG_METRIC, mode="min", max_t=total,
                         grace_period=rung_tokens(rung, total), reduction_factor=1 / rung,
                         stop_last_trials=False)


def rung_tokens(fraction: float, total_tokens: int) -> int:
    """The token count of a rung at ``fraction`` of the budget."""
    return max(int(round(fraction * total_tokens)), 1)


def stage_rung_tokens(search, total_tokens: int) -> tuple[int, ...]:
    """The search stage's rungs: ``search.rung`` (ASHA's) and ``search.rung_trace``."""
    fractions = sorted({f for f in (search.rung, *search.rung_trace) if f})
    return tuple(rung_tokens(f, total_tokens) for f in fractions)


class RungScorer:
    """A trial's multi-fidelity rungs (``TrialSpec.rung_tokens``): when its ladder passes
    one, the report carries ``rung_objective`` (the search's objective on held-out text, as
    the ladder stands) and ``rung_tokens``; ASHA reads the first (``rung_scheduler``).
    A trial restored past a rung does not score it again (its earlier attempt reported it).
    ``seconds``: time spent scoring, counted as evaluation, not training."""

    def __init__(self, spec: TrialSpec, cfg: TrainConfig, tokens_done: int) -> None:
        self.spec, self.cfg = spec, cfg
        self.pending = sorted(t for t in spec.rung_tokens if t > tokens_done)
        self.evaluator, self.seconds = None, 0.0

    def due(self, trainer: LadderTrainer) -> bool:
        return bool(self.pending) and trainer.tokens >= self.pending[0] and not trainer.done

    def score(self, trainer: LadderTrainer) -> dict[str, float]:
        start = time.monotonic()
        passed = [t for t in self.pending if t <= trainer.tokens]
        self.pending = self.pending[len(passed):]
        if self.evaluator is None:
            self.evaluator = heldout(self.spec, self.cfg)
        value = rung_score(self.spec, self.cfg, trainer.result(), self.evaluator)
        self.seconds += time.monotonic() - start
        return {RUNG_METRIC: value, "rung_tokens": passed[-1],
                "eval_seconds": self.seconds}
