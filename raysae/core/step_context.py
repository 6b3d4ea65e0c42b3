"""What an SAE kind's training hooks see of one ladder step (``StepContext``), so kinds
never reach into the trainer: its config, the stacked SAEs, the step, the members' targets
and lambdas, whether the L0 controller is moving, the recipe's penalty weighting and the
dead-feature mask (computed only when a kind asks, e.g. TopK's AuxK)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from raysae.core.config import TrainConfig


@dataclass(frozen=True)
class StepContext:
    """One step of a ladder of K SAEs, as the kinds' hooks need it."""

    cfg: TrainConfig
    """The ladder's training config (penalty, SAE shape, schedule)."""
    model: nn.Module
    """The K stacked SAEs (raysae.core.ladder_sae.LadderSAE) with the kind's state."""
    step: int
    """0-based index of this step (in ``log_fields``: of the step just taken)."""
    targets: torch.Tensor
    """[K] float64 target L0 of each member, on the device."""
    lam: torch.Tensor
    """[K] the sparsity coefficient of each member at this step."""
    controlling: bool
    """Whether the L0 controller moves lambda at this step."""
    penalty_weighting: str
    """How the penalty sees decoder norms (raysae.core.recipes): none, inside, outside."""
    dead_mask: Callable[[], torch.Tensor]
    """[K, d_sae] bool: features that did not fire within the dead window."""

    @property
    def k(self) -> int:
        """Members in the ladder."""
        return int(self.targets.shape[0])
