"""What every trainer shares: how training ended (``TrainResult`` and its statuses), the
errors it raises, and ``drive``, the loop over batches."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from raysae.core.sae import SAE

FINISHED, DIVERGED, DATA_EXHAUSTED = "finished", "diverged", "data_exhausted"


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


def drive(trainer, batches: Iterable[torch.Tensor], on_log=None):
    """The training loop of any trainer with ``done``, ``step`` and ``result`` (a single SAE
    or a ladder ensemble): step until done, hand every logged row(s) to ``on_log``."""
    for x in batches:
        if trainer.done:
            break
        logged = trainer.step(x)
        if logged is not None and on_log is not None:
            on_log(logged, trainer)
    return trainer.result()
