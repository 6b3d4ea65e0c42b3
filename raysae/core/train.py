"""Train an SAE from any iterator of activation batches (no Ray here).

``train_sae(cfg, batches)`` is the whole loop; ``Trainer`` is the same loop one
step at a time, with a checkpointable state: a ladder of one SAE
(``raysae.core.ensemble.EnsembleTrainer``, which the search's trials use).

Loss per step: ``mean_tokens ||x_hat - x||^2 + lambda * mean_tokens(penalty(f))``
on activations scaled by one fixed factor (mean ||x||^2 = d_in) when
``normalize_activations`` is on; the factor is folded into the weights at the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch

from raysae.core.config import TrainConfig
from raysae.core.ensemble import EnsembleTrainer
from raysae.core.outcome import (  # re-exported: the public names of training
    DATA_EXHAUSTED,
    DIVERGED,
    FINISHED,
    CheckpointError,
    NonFiniteActivationsError,
    TrainResult,
    drive,
)
from raysae.core.sae import SAE


class Trainer:
    """One SAE, its optimiser and its schedule, advanced one batch at a time: a ladder of one
    (``EnsembleTrainer``), so the single SAE and the job's ladders share one training step.

    ``cfg.l0_target`` set: the controller drives lambda from ``cfg.lam / rho(1)`` to that L0
    during ``control_frac`` of training; unset: lambda is ``cfg.lam``, ramped up over
    ``lam_warmup_frac``. Rows, results and checkpoints are the member's.
    """

    def __init__(self, cfg: TrainConfig, *, _ladder: Any = None):
        if cfg.sae is None:
            raise ValueError("TrainConfig.sae is None: give the SAE's shape (SAEConfig)")
        if cfg.kind != "relu":
            raise ValueError(f"Trainer trains relu SAEs only, not kind {cfg.kind!r}; use "
                             "raysae.core.ensemble.EnsembleTrainer (every kind)")
        self.cfg = cfg
        fixed = cfg.l0_target is None
        inner = dataclasses.replace(cfg, control_frac=0.0) if fixed else cfg
        target = float(cfg.sae.d_sae) if fixed else float(cfg.l0_target)
        self.ladder = _ladder or EnsembleTrainer(inner, [target],
                                                 lams=[cfg.lam] if fixed else None)

    done = property(lambda self: self.ladder.done)
    step_count = property(lambda self: self.ladder.step_count)
    tokens = property(lambda self: self.ladder.tokens)
    scale = property(lambda self: self.ladder.scale)
    history = property(lambda self: self.ladder.history[0])
    lam = property(lambda self: float(self.ladder.lam[0]))

    @property
    def sae(self) -> SAE:
        """The SAE as it stands (a CPU copy, input scale not folded in)."""
        return self.ladder.model.member(0)

    def current_lam(self) -> float:
        return float(self.ladder.current_lam()[0])

    def step(self, x: torch.Tensor) -> dict[str, float] | None:
        """Train on one batch; returns a metrics row on logging steps, else None."""
        rows = self.ladder.step(x)
        return rows[0] if rows else None

    def result(self) -> TrainResult:
        """The trained SAE with the input scale folded in, and how training ended."""
        return self.ladder.result()[0]

    def state_dict(self) -> dict[str, Any]:
        return self.ladder.state_dict()

    def to_bytes(self) -> bytes:
        return self.ladder.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes, cfg: TrainConfig | None = None) -> Trainer:
        """Rebuild a trainer from ``to_bytes`` output; never unpickles arbitrary objects."""
        ladder = EnsembleTrainer.from_bytes(data)
        return cls(cfg or ladder.cfg, _ladder=ladder)


__all__ = ["DATA_EXHAUSTED", "DIVERGED", "FINISHED", "CheckpointError",
           "NonFiniteActivationsError", "TrainResult", "Trainer", "drive", "train_sae"]


def train_sae(
    cfg: TrainConfig,
    batches: Iterable[torch.Tensor],
    *,
    trainer: Trainer | None = None,
    on_log: Callable[[dict[str, float], Trainer], None] | None = None,
) -> TrainResult:
    """Train until ``cfg.total_tokens`` or divergence; ``on_log`` sees every metrics row."""
    return drive(trainer or Trainer(cfg), batches, on_log)
