"""A trial's multi-fidelity rungs (the trial side; the policies that stop proposals at them
are the driver's, raysae.search.multifidelity): at each token count of
``TrialSpec.rung_tokens`` the trial scores its ladder with the search's own objective on
held-out text and reports it as ``rung_objective`` with ``rung_tokens``."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from raysae.search.trial.members import heldout, rung_score

if TYPE_CHECKING:
    from raysae.core.config import TrainConfig
    from raysae.core.ladder import LadderTrainer
    from raysae.search.trial.spec import TrialSpec

RUNG_METRIC, RUNG_TIME = "rung_objective", "tokens_seen"
"""What a rung report carries and ASHA compares, and the report's clock."""


def unscored(spec) -> dict[str, float]:
    """What every report of a stage with rungs carries before its rung's score: ASHA makes
    Tune check that each report has its metric, so NaN (ASHA and the driver's searcher skip
    non-finite values); nothing in a stage without rungs."""
    return {RUNG_METRIC: math.nan} if spec.rung_tokens else {}


class RungScorer:
    """A trial's rungs (``TrialSpec.rung_tokens``): when its ladder passes one, the report
    carries ``rung_objective`` (the search's objective on held-out text, as the ladder
    stands) and ``rung_tokens``; ASHA reads the first. A trial restored past a rung does not
    score it again (its earlier attempt reported it). ``seconds``: time spent scoring,
    counted as evaluation, not training."""

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
        return {RUNG_METRIC: value, "rung_tokens": trainer.tokens, "rung_fraction":
                trainer.tokens / self.cfg.total_tokens, "eval_seconds": self.seconds}
