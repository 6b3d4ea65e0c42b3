"""K SAEs of one kind held as stacked weights and run with batched matmuls (the ladder's
model; ``raysae.core.ladder`` trains it): the four tensors every kind trains (``W_enc``,
``W_dec``, ``b_enc``, ``b_dec``) and the kind's own state (``state``, raysae.core.kinds)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from raysae.core.config import SAEConfig
from raysae.core.kinds import DEFAULT_KIND, KindOptions, get_kind
from raysae.core.recipes import UNIT_NORM, Recipe, get_recipe
from raysae.core.sae import SAE, remove_parallel_grad_, unit_rows_

_PARAMS = ("W_enc", "W_dec", "b_enc", "b_dec")


class LadderSAE(nn.Module):
    """K SAEs of one kind, stacked; member k starts as ``SAE(cfg, seed=seeds[k])`` with its
    decoder rows (and encoder columns) at the recipe's initial norm; ``targets`` (default 1.0
    each) and ``options`` (default: the kind's defaults) make the kind's state."""

    def __init__(self, cfg: SAEConfig, seeds: Sequence[int | None], *, kind: str = DEFAULT_KIND,
                 targets: Sequence[float] | None = None, recipe: Recipe | None = None,
                 options: KindOptions | None = None):
        super().__init__()
        self.cfg, self.k, self.kind = cfg, len(seeds), get_kind(kind)
        self.recipe = recipe or get_recipe(UNIT_NORM)
        members = [SAE(cfg, seed=s) for s in seeds]
        for name in _PARAMS:
            stacked = torch.stack([getattr(m, name).detach() for m in members])
            if name in ("W_enc", "W_dec"):
                stacked = stacked * self.recipe.decoder_init_norm
            setattr(self, name, nn.Parameter(stacked))
        self.state = self.kind.make_state(options or self.kind.options(),
                                          [float(t) for t in targets or [1.0] * self.k], cfg)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, d_in] -> W_enc (x - b_dec) + b_enc [K, B, d_sae]. ``x - b_dec`` enters
        detached; b_dec's encoder gradient comes from ``y - y.detach()`` (exactly 0), with
        ``y = b_dec W_enc.detach()``, so backward skips a [K, B, d_sae] x [K, d_sae, d_in]
        product."""
        y = torch.bmm(self.b_dec.unsqueeze(1), self.W_enc.detach())
        bias = self.b_enc.unsqueeze(1) - (y - y.detach())
        centred = x.unsqueeze(0) - self.b_dec.detach().unsqueeze(1)
        return torch.baddbmm(bias, centred, self.W_enc)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.b_dec.unsqueeze(1), f, self.W_dec)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, d_in] -> (x_hat [K, B, d_in], f [K, B, d_sae]) (training activation)."""
        f = self.kind.activate(self, self.pre_acts(x))
        return self.decode(f), f

    def decoder_norms(self) -> torch.Tensor:
        """[K, d_sae] norm of every decoder row (differentiable)."""
        return self.W_dec.norm(dim=-1)

    def normalize_decoder_(self) -> None:
        if self.recipe.unit_norm_decoder:
            unit_rows_(self.W_dec)

    def remove_parallel_grad_(self) -> None:
        if self.recipe.unit_norm_decoder:
            remove_parallel_grad_(self.W_dec)

    @torch.no_grad()
    def member(self, k: int) -> SAE:
        """Member k as an SAE with its inference architecture (a CPU copy)."""
        exported = self.kind.export(self, k)
        sae = SAE(self.cfg, exported.pop("architecture"), seed=None,
                  **{n: v.detach().float().cpu() if torch.is_tensor(v) else v
                     for n, v in exported.items()})
        if not self.recipe.unit_norm_decoder:
            sae.fold_decoder_norms_()
        return sae

    @torch.no_grad()
    def finite_members(self) -> torch.Tensor:
        """[K] bool: every weight of member k is finite (device tensor, no sync)."""
        return torch.stack([p.isfinite().flatten(1).all(1) for p in self.parameters()]).all(0)
