"""How training ended (``TrainResult`` and its statuses) and the errors it raises; the loop
over batches is raysae.core.training."""

from __future__ import annotations

from dataclasses import dataclass, field

from raysae.core.sae import SAE
from raysae.results.vocabulary import Status

FINISHED, DIVERGED, DATA_EXHAUSTED = Status.FINISHED, Status.DIVERGED, Status.DATA_EXHAUSTED


class NonFiniteActivationsError(ValueError):
    """An activation batch holds NaN or inf: a broken model or a corrupt cache shard."""


class CheckpointError(ValueError):
    """A trainer checkpoint is truncated, corrupt, or not loadable without executing code."""


@dataclass
class TrainResult:
    """What training produced. ``sae`` reads raw activations (scale folded in)."""

    sae: SAE
    status: str
    steps: int
    tokens: int
    lam: float
    activation_scale: float
    history: list[dict[str, float]] = field(default_factory=list)
    reason: str | None = None

    @property
    def final_metrics(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}

