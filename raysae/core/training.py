"""The training loop: ``drive`` steps a ladder (``LadderTrainer``) over batches until it is
done; ``train_ladder`` builds the ladder and drives it; ``ladder_of_one`` is one SAE as a
ladder of one member (what a single SAE is everywhere, e.g. ``drive(ladder_of_one(cfg), b)[0]``).

Loss per step: ``mean_tokens ||x_hat - x||^2 + lambda * mean_tokens(penalty(f))`` on
activations scaled by one fixed factor (mean ||x||^2 = d_in) when ``normalize_activations``
is on; the factor is folded into the weights at the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import torch

from raysae.core.config import TrainConfig
from raysae.core.kinds import get_kind
from raysae.core.ladder import LadderTrainer
from raysae.core.outcome import TrainResult
from raysae.core.transfer import device_batches

OnLog = Callable[[list[dict[str, float]], LadderTrainer], None]
OnStep = Callable[[LadderTrainer], None]


def drive(trainer: LadderTrainer, batches: Iterable[torch.Tensor],
          on_log: OnLog | None = None, on_step: OnStep | None = None) -> list[TrainResult]:
    """Step ``trainer`` until done, handing the trainer to ``on_step`` after every step (a
    host-side check, e.g. a rung at a token count) and then every logging step's member rows
    to ``on_log``; one result per member. On CUDA each batch's copy overlaps the step before
    it (core/transfer.py)."""
    for x in device_batches(batches, trainer.device):
        if trainer.done:
            break
        logged = trainer.step(x)
        if on_step is not None:  # first: a rung's report precedes the logging step's
            on_step(trainer)
        if logged is not None and on_log is not None:
            on_log(logged, trainer)
    return trainer.result()


def train_ladder(cfg: TrainConfig, targets: Sequence[float], batches: Iterable[torch.Tensor],
                 *, trainer: LadderTrainer | None = None, on_log: OnLog | None = None,
                 on_step: OnStep | None = None) -> list[TrainResult]:
    """Train the ladder (one member per target L0) until ``cfg.total_tokens`` or every member
    diverged."""
    return drive(trainer or LadderTrainer(cfg, targets), batches, on_log, on_step)


def ladder_of_one(cfg: TrainConfig) -> LadderTrainer:
    """One SAE: a member controlled toward ``cfg.l0_target`` if set, else one at the fixed
    lambda ``cfg.lam`` (ramped up over ``lam_warmup_frac``; its target is d_sae, unused)."""
    if cfg.l0_target is not None or cfg.sae is None:
        return LadderTrainer(cfg, [cfg.l0_target or 1.0])
    if not get_kind(cfg.kind).uses_lambda:
        raise ValueError(f"kind {cfg.kind!r} has no lambda to fix: give l0_target")
    return LadderTrainer(dataclasses.replace(cfg, control_frac=0.0), [cfg.sae.d_sae],
                           lams=[cfg.lam])
