"""The Gated SAE (kind ``gated``; Rajamanoharan et al. 2024, arXiv 2404.16014): which
features fire and how strongly are decided by two paths that share the encoder.

    pi_gate = (x - b_dec) W_enc + b_gate           f_gate = 1[pi_gate > 0]
    pi_mag  = (x - b_dec) (W_enc * exp(r_mag)) + b_mag = (pi_gate - b_gate) exp(r_mag) + b_mag
    f = f_gate * relu(pi_mag),   x_hat = f W_dec + b_dec

so the L1 penalty that makes the gate sparse does not shrink the magnitudes. Training, as
dictionary_learning's ``GatedSAETrainer`` and SAELens's ``GatedTrainingSAE``:

    loss = ||x - x_hat||^2 + lambda * sum_i relu(pi_gate_i) ||d_i||
           + aux_coef * ||x - (relu(pi_gate) W_dec.detach() + b_dec.detach())||^2

The reconstruction trains the magnitude path (the gate's step has no gradient); the L1 term
and the auxiliary reconstruction train the gate. Decoder rows keep unit norm (as
dictionary_learning's constrained Adam), so ||d_i|| = 1. lambda_k is driven to each member's
target L0 by the trainer's controller, as for the penalties.

In the ladder the gate's bias is the ladder's ``b_enc`` (its pre-activation is the ladder's
``pre``); ``r_mag`` and ``b_mag`` are the kind's state. Saved as SAELens ``gated``
(``W_enc, W_dec, b_gate, r_mag, b_mag, b_dec``; no ``b_enc``), which SAELens loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raysae.core.architectures import Architecture, register_architecture
from raysae.core.kinds import (
    KindOptions,
    KindState,
    LossTerms,
    SAEKind,
    StepContext,
    register_kind,
)
from raysae.settings import is_number, require


@register_architecture
class GatedArchitecture(Architecture):
    """SAELens's ``gated``: a gate and a magnitude path sharing W_enc (module doc)."""

    name = "gated"
    tensors = {"W_enc": ("d_in", "d_sae"), "W_dec": ("d_sae", "d_in"), "b_gate": ("d_sae",),
               "r_mag": ("d_sae",), "b_mag": ("d_sae",), "b_dec": ("d_in",)}

    def encode(self, sae: Any, x: torch.Tensor) -> torch.Tensor:
        centred = x - sae.b_dec
        gate = centred @ sae.W_enc + sae.b_gate > 0
        magnitude = centred @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
        return gate * magnitude.relu()

    def fold_norms_(self, sae: Any, norms: torch.Tensor) -> None:
        """Feature i times ||d_i||: both paths' pre-activations scale by it (a positive
        factor keeps the gate's sign); r_mag, a ratio, is unchanged."""
        sae.W_enc *= norms
        sae.b_gate *= norms
        sae.b_mag *= norms


@dataclass(frozen=True)
class GatedOptions(KindOptions):
    aux_coef: float = 1.0
    """Weight of the auxiliary reconstruction from relu(pi_gate) through the detached
    decoder (1 in the paper, dictionary_learning and SAELens)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(is_number(self.aux_coef) and self.aux_coef >= 0, "aux_coef", self.aux_coef,
                "must be a number >= 0")


class GatedState(KindState):
    """The magnitude path's rescaling ``r_mag`` and bias ``b_mag`` ([K, d_sae], trained,
    zero at start as in SAELens)."""

    def __init__(self, options: GatedOptions, targets: list[float], cfg: Any) -> None:
        super().__init__(options, targets, cfg)
        self.r_mag = nn.Parameter(torch.zeros(len(targets), cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(len(targets), cfg.d_sae))


@register_kind
class Gated(SAEKind):
    """A gate trained by an L1 penalty (lambda to the target L0) and a magnitude path
    trained by the reconstruction (module doc)."""

    name, label, saelens_architecture = "gated", "Gated", "gated"
    Options, State = GatedOptions, GatedState
    uses_penalty, uses_lambda, uses_controller, sparse_step = False, True, True, False
    baseline, in_default_search = True, False  # one --baselines flag away
    style = {"color": "#6a3d9a", "ls": "-", "marker": "D"}

    def activate(self, model: nn.Module, pre: torch.Tensor) -> torch.Tensor:
        state = model.state
        magnitude = ((pre - model.b_enc.unsqueeze(1)) * state.r_mag.exp().unsqueeze(1)
                     + state.b_mag.unsqueeze(1))
        return (pre > 0) * magnitude.relu()

    def loss_terms(self, ctx: StepContext, x, x_hat, f, pre) -> LossTerms:
        model = ctx.model
        gate = pre.relu()
        l1 = (gate * model.decoder_norms().unsqueeze(1)).sum(-1).mean(-1)
        via_gate = torch.baddbmm(model.b_dec.detach().unsqueeze(1), gate, model.W_dec.detach())
        aux = (via_gate.float() - x).pow(2).sum(-1).mean(-1)
        return LossTerms({"gate_l1": ctx.lam.float() * l1,
                          "aux_recon": ctx.state.options.aux_coef * aux}, l1)

    def export(self, model: nn.Module, k: int) -> dict[str, Any]:
        return {"architecture": "gated", "W_enc": model.W_enc[k], "W_dec": model.W_dec[k],
                "b_gate": model.b_enc[k], "r_mag": model.state.r_mag[k],
                "b_mag": model.state.b_mag[k], "b_dec": model.b_dec[k]}
