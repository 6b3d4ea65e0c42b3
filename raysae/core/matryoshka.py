"""Matryoshka BatchTopK (kind ``matryoshka``; Bussmann et al. 2025, arXiv 2503.17547):
nested prefixes of the dictionary, widths ``w_1 < w_2 < ... < w_L = d_sae``, each
reconstruct the input, so the first features learn the most general directions.

Selection, inference threshold and saving are BatchTopK's (raysae.core.kinds): each member
keeps the round(t_k * B) largest relu(pre) of its batch, theta_k is the EMA of the smallest
kept value, and a trained member is saved as SAELens ``jumprelu`` with theta_k for every
feature. The loss adds, for every inner width w (all but the last, whose reconstruction is
the trainer's own MSE), the prefix's reconstruction error

    x_hat_w = f[..., :w] W_dec[:w] + b_dec,    mean_tokens ||x - x_hat_w||^2

summed over levels with weight 1 (as SAELens), plus AuxK on the full residual (as
BatchTopK). The prefixes read the SAME batch selection f, restricted to their first w
features (the paper's and dictionary_learning's ``MatryoshkaBatchTopKTrainer``), not a new
BatchTopK over ``pre[..., :w]`` per prefix (SAELens's ``MatryoshkaBatchTopKTrainingSAE``):
so the kept features, the L0 and the inference threshold are those of one selection, and
L0 and the saved threshold mean exactly what they mean for BatchTopK. The prefix decodes
are cumulative (``x_hat_{w_i} = x_hat_{w_(i-1)} + f[..., w_(i-1):w_i] W_dec[w_(i-1):w_i]``),
one batched matmul per level over its own slice of features: all levels together cost one
decode of the first ``w_(L-1)`` features. The fixed-k decoder (``sparse_step = "on"``)
decodes each prefix from the kept values with the others masked to 0.

Widths: ``round(fraction * d_sae)`` for the option ``fractions``; they must be strictly
increasing and end at d_sae, and the smallest must be at least the largest target L0 of the
ladder (SAELens: the smallest width >= k), else the ladder is refused. The default
(1/4, 1/2, 1) fits the local ladder (d_sae 512, targets 4..128: widths 128, 256, 512) and
pythia-70m's (d_sae 2048, targets 8..256: 512, 1024, 2048).

Loss terms (logged per member as ``<name>_loss``): ``auxk`` (also ``penalty_loss``, as
BatchTopK) and ``prefix_w<w>``, each inner prefix's MSE. No host sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raysae.core.fixed_k import FixedKFeatures, fixed_k_decode
from raysae.core.kinds import LossTerms, StepContext, register_kind
from raysae.core.topk import BatchTopK, BatchTopKOptions, BatchTopKState
from raysae.settings import is_number, require


def matryoshka_widths(d_sae: int, fractions: tuple[float, ...]) -> list[int]:
    """``round(fraction * d_sae)`` for every fraction, checked: strictly increasing, the
    last d_sae (a ValueError says what is wrong)."""
    widths = [round(f * d_sae) for f in fractions]
    if not widths or widths[-1] != d_sae or widths[0] < 1 or any(
            a >= b for a, b in zip(widths, widths[1:])):
        raise ValueError(f"matryoshka widths {widths} (fractions {tuple(fractions)} of "
                         f"d_sae={d_sae}) must be strictly increasing, >= 1, and end at d_sae")
    return widths


@dataclass(frozen=True)
class MatryoshkaOptions(BatchTopKOptions):
    fractions: tuple[float, ...] = (1 / 4, 1 / 2, 1.0)
    """Prefix widths as fractions of d_sae, increasing, the last 1 (the whole dictionary)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "fractions", tuple(self.fractions))
        ok = (bool(self.fractions) and all(is_number(f) and 0 < f <= 1 for f in self.fractions)
              and self.fractions[-1] == 1.0
              and all(a < b for a, b in zip(self.fractions, self.fractions[1:])))
        require(ok, "fractions", self.fractions, "must be increasing fractions in (0, 1] "
                "ending at 1", "pass e.g. {fractions} 0.25 0.5 1")


class MatryoshkaState(BatchTopKState):
    """BatchTopK's state and the prefix widths."""

    def __init__(self, options: MatryoshkaOptions, targets: list[float], cfg: Any) -> None:
        super().__init__(options, targets, cfg)
        self.widths = matryoshka_widths(cfg.d_sae, options.fractions)
        if self.widths[0] < max(targets):
            raise ValueError(
                f"matryoshka: the smallest prefix ({self.widths[0]} of d_sae={cfg.d_sae}, "
                f"fractions {options.fractions}) is narrower than the largest target L0 "
                f"{max(targets):g}; widen the SAE or lower the targets")


@register_kind
class MatryoshkaBatchTopK(BatchTopK):
    """BatchTopK whose nested dictionary prefixes each reconstruct x (module doc)."""

    name, label = "matryoshka", "Matryoshka"
    Options, State = MatryoshkaOptions, MatryoshkaState
    baseline, in_default_search = True, False  # a reference frontier, one --baselines flag away
    style = {"color": "#a0522d", "ls": "-", "marker": "*"}

    def inner_losses(self, model: nn.Module, x: torch.Tensor, f) -> dict[str, torch.Tensor]:
        """Each inner prefix's mean_tokens ||x - x_hat_w||^2 [K] (float32), by name."""
        out = {}
        widths = model.state.widths[:-1]
        if isinstance(f, FixedKFeatures):
            feature = f.index % f.shape[2]
            for w in widths:
                x_hat = fixed_k_decode(model, f._replace(values=f.values * (feature < w)))
                out[f"prefix_w{w}"] = (x_hat.float() - x).pow(2).sum(-1).mean(-1)
        else:
            x_hat, start = model.b_dec.unsqueeze(1), 0
            for w in widths:
                x_hat = torch.baddbmm(x_hat, f[..., start:w], model.W_dec[:, start:w])
                out[f"prefix_w{w}"] = (x_hat.float() - x).pow(2).sum(-1).mean(-1)
                start = w
        return out

    def loss_terms(self, ctx: StepContext, x, x_hat, f, pre) -> LossTerms:
        terms, aux = super().loss_terms(ctx, x, x_hat, f, pre)
        return LossTerms({**terms, **self.inner_losses(ctx.model, x, f)}, aux)
