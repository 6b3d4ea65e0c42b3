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

Widths: ``round(fraction * d_sae)`` for ``MATRYOSHKA_FRACTIONS`` (the class attribute
``fractions``); they must be strictly increasing and end at d_sae, and the smallest must be
at least the largest target L0 of the ladder (SAELens: the smallest width >= k), else
``setup`` raises. The default (1/4, 1/2, 1) fits the local ladder (d_sae 512, targets 4..128:
widths 128, 256, 512) and pythia-70m's (d_sae 2048, targets 8..256: 512, 1024, 2048).

Logged per member (logging steps): ``penalty_loss`` is AuxK (as BatchTopK), ``inner_loss``
the summed prefix MSEs, ``recon_loss_w<w>`` each prefix's MSE. No host sync.
"""

from __future__ import annotations

import torch
from torch import nn

from raysae.core.fixed_k import FixedKFeatures, fixed_k_decode
from raysae.core.kinds import BatchTopK, StepContext, register_kind

MATRYOSHKA_FRACTIONS = (1 / 4, 1 / 2, 1.0)
"""Default prefix widths as fractions of d_sae (the last is the whole dictionary)."""


def matryoshka_widths(d_sae: int, fractions=MATRYOSHKA_FRACTIONS) -> list[int]:
    """``round(fraction * d_sae)`` for every fraction, checked: strictly increasing, the
    last d_sae (a ValueError says what is wrong)."""
    widths = [round(f * d_sae) for f in fractions]
    if not widths or widths[-1] != d_sae or widths[0] < 1 or any(
            a >= b for a, b in zip(widths, widths[1:])):
        raise ValueError(f"matryoshka widths {widths} (fractions {tuple(fractions)} of "
                         f"d_sae={d_sae}) must be strictly increasing, >= 1, and end at d_sae")
    return widths


@register_kind
class MatryoshkaBatchTopK(BatchTopK):
    """BatchTopK whose nested dictionary prefixes each reconstruct x (module doc)."""

    name, label = "matryoshka", "Matryoshka"
    baseline, in_default_search = True, False  # a reference frontier, one --baselines flag away
    style = {"color": "#a0522d", "ls": "-", "marker": "*"}
    fractions: tuple[float, ...] = MATRYOSHKA_FRACTIONS

    def setup(self, model: nn.Module, targets: list[float]) -> None:
        super().setup(model, targets)
        widths = matryoshka_widths(model.cfg.d_sae, self.fractions)
        if widths[0] < max(targets):
            raise ValueError(
                f"matryoshka: the smallest prefix ({widths[0]} of d_sae={model.cfg.d_sae}, "
                f"fractions {tuple(self.fractions)}) is narrower than the largest target L0 "
                f"{max(targets):g}; widen the SAE or lower the targets")
        model.matryoshka_widths = widths
        model.matryoshka_inner = torch.zeros(len(targets), len(widths) - 1)

    def inner_losses(self, model: nn.Module, x: torch.Tensor, f) -> torch.Tensor:
        """[K, L - 1]: each inner prefix's mean_tokens ||x - x_hat_w||^2 (float32)."""
        widths = model.matryoshka_widths[:-1]
        if not widths:
            return x.new_zeros(model.k, 0)
        out = []
        if isinstance(f, FixedKFeatures):
            feature = f.index % f.shape[2]
            for w in widths:
                x_hat = fixed_k_decode(model, f._replace(values=f.values * (feature < w)))
                out.append((x_hat.float() - x).pow(2).sum(-1).mean(-1))
        else:
            x_hat, start = model.b_dec.unsqueeze(1), 0
            for w in widths:
                x_hat = torch.baddbmm(x_hat, f[..., start:w], model.W_dec[:, start:w])
                out.append((x_hat.float() - x).pow(2).sum(-1).mean(-1))
                start = w
        return torch.stack(out, dim=1)

    def loss_terms(self, ctx: StepContext, x, x_hat, f, pre) -> tuple[torch.Tensor, torch.Tensor]:
        aux, _ = super().loss_terms(ctx, x, x_hat, f, pre)
        inner = self.inner_losses(ctx.model, x, f)
        ctx.model.matryoshka_inner = inner.detach()
        return aux + inner.sum(dim=1), aux

    def log_fields(self, ctx: StepContext) -> list[dict[str, float]]:
        rows = super().log_fields(ctx)
        inner, widths = ctx.model.matryoshka_inner.tolist(), ctx.model.matryoshka_widths
        for row, levels in zip(rows, inner, strict=True):
            row["inner_loss"] = sum(levels)
            row.update({f"recon_loss_w{w}": v for w, v in zip(widths, levels)})
        return rows
