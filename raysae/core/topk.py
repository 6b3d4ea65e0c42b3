"""The fixed-sparsity kinds: TopK and BatchTopK, with AuxK for dead features.

- ``topk``: keep the k_k = max(1, round(t_k)) largest relu(pre) per token; no penalty, no
  controller, lambda 0. All K members in one ``topk(max k)`` whose sorted tail beyond k_k is
  masked to 0 (no loop over members). Saved as SAELens ``topk`` with ``k``.
- ``batchtopk``: keep the n_k = round(t_k * B) largest relu(pre) of the whole batch (so a
  fractional t_k works). Inference threshold theta_k: the smallest kept positive value of
  each training batch, averaged by an EMA (first value, then ``threshold_beta``). SAELens
  uses 0.99 and dictionary_learning 0.999 from step 1000, for runs of 10^5 steps; in runs of
  a few hundred steps the kept minimum drifts down while training and 0.99 lags it (the
  default, 0.9, follows it; a batch's minimum is an order statistic of t_k * B values, so a
  short window is not noisy). Saved as SAELens ``jumprelu`` with theta_k for every feature
  (as SAELens converts BatchTopK), so inference L0 is measured with the threshold.

AuxK (both, on by default as in dictionary_learning and SAELens): the top ``auxk_k``
(default d_in // 2) relu(pre) among dead features (the trainer's dead window) reconstruct
the detached residual ``x - x_hat`` through W_dec (no bias); the loss
``||e - e_aux||^2 / ||e - mean(e)||^2`` (OpenAI's normalisation) enters with weight
``auxk_coef`` (1/32); it is 0 for a member with no dead features, and ``auxk_coef = 0``
turns it off.

Both are ``fixed_k``: one topk of a size known on the host picks their kept values, so
training may decode them by index (``activate_fixed``, raysae.core.fixed_k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raysae.core.fixed_k import FixedKFeatures
from raysae.core.kinds import (
    KindOptions,
    KindState,
    LossTerms,
    SAEKind,
    StepContext,
    register_kind,
)
from raysae.settings import is_int, is_number, require


@dataclass(frozen=True)
class AuxKOptions(KindOptions):
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss that makes dead features reconstruct the residual (0: off)."""
    auxk_k: int | None = None
    """Dead features that reconstruct the residual per token (default: d_in // 2)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(is_number(self.auxk_coef) and self.auxk_coef >= 0, "auxk_coef",
                self.auxk_coef, "must be a number >= 0")
        require(self.auxk_k is None or (is_int(self.auxk_k) and self.auxk_k >= 1), "auxk_k",
                self.auxk_k, "must be an integer >= 1 (or unset: d_in // 2)")


def _keep_sorted_head(values: torch.Tensor, idx: torch.Tensor, keep: torch.Tensor,
                      shape: torch.Size) -> torch.Tensor:
    """Scatter ``values`` (sorted descending along -1) into zeros, the tail beyond ``keep``
    masked to 0 (``keep`` is a bool mask broadcast to ``values``)."""
    kept = values * keep
    return torch.zeros(shape, dtype=values.dtype, device=values.device).scatter(-1, idx, kept)


class _Sparse(SAEKind):
    uses_penalty = uses_lambda = uses_controller = sparse_step = False
    Options = AuxKOptions

    def loss_terms(self, ctx: StepContext, x, x_hat, f, pre) -> LossTerms:
        options = ctx.state.options
        aux = (self.auxk(ctx, x, x_hat, pre) if options.auxk_coef
               else x_hat.new_zeros(ctx.k))
        return LossTerms({"auxk": aux}, aux)

    def auxk(self, ctx: StepContext, x, x_hat, acts) -> torch.Tensor:
        """AuxK loss [K] (module doc); ``acts`` are relu(pre) [K, B, d_sae]."""
        options = ctx.state.options
        dead = ctx.dead_mask()  # [K, d_sae] bool
        k_aux = min(options.auxk_k or ctx.cfg.sae.d_in // 2, acts.shape[-1])
        cand = torch.where(dead.unsqueeze(1), acts, float("-inf"))
        vals, idx = cand.topk(k_aux, dim=-1)
        vals = torch.where(torch.isfinite(vals), vals, 0.0)
        aux_f = torch.zeros_like(acts).scatter(-1, idx, vals)
        e = (x - x_hat).detach()
        l2 = (e - torch.bmm(aux_f, ctx.model.W_dec)).pow(2).sum(-1).mean(-1)
        denom = (e - e.mean(dim=1, keepdim=True)).pow(2).sum(-1).mean(-1)
        return options.auxk_coef * (l2 / denom).nan_to_num(0.0) * dead.any(dim=-1)


class TopKState(KindState):
    """Each member's k (``ks``, host ints) and the mask of the kept head of one
    ``topk(k_max)`` ([K, 1, k_max])."""

    def __init__(self, options: AuxKOptions, targets: list[float], cfg: Any) -> None:
        super().__init__(options, targets, cfg)
        self.ks = [max(1, round(t)) for t in targets]
        self.k_max = max(self.ks)
        keep = torch.arange(self.k_max).unsqueeze(0) < torch.tensor(self.ks).unsqueeze(1)
        self.register_buffer("keep", keep.unsqueeze(1), persistent=False)


@register_kind
class TopK(_Sparse):
    """Top k_k = max(1, round(t_k)) relu(pre) per token."""

    name, label, saelens_architecture = "topk", "TopK", "topk"
    State = TopKState
    fixed_k = baseline = True
    style = {"color": "#222222", "ls": "-", "marker": "s"}

    def activate(self, model: nn.Module, pre: torch.Tensor) -> torch.Tensor:
        state = model.state
        vals, idx = pre.relu_().topk(state.k_max, dim=-1)
        return _keep_sorted_head(vals, idx, state.keep, pre.shape)

    def activate_fixed(self, model: nn.Module, pre: torch.Tensor) -> FixedKFeatures:
        """k_max values per token, token-major (each token's in topk order)."""
        k, b, d = pre.shape
        state = model.state
        vals, idx = pre.relu_().topk(state.k_max, dim=-1)  # [K, B, k_max]
        index = idx + torch.arange(0, b * d, d, device=idx.device).unsqueeze(1)
        return FixedKFeatures((vals * state.keep).flatten(1), index.flatten(1),
                              (k, b, d), state.k_max)

    def fixed_k_l0(self, model: nn.Module) -> float:
        return float(model.state.k_max)

    def export(self, model: nn.Module, k: int) -> dict[str, Any]:
        return {**super().export(model, k), "k": model.state.ks[k]}


@dataclass(frozen=True)
class BatchTopKOptions(AuxKOptions):
    threshold_beta: float = 0.9
    """EMA factor of the inference threshold (the smallest kept value of each batch)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(is_number(self.threshold_beta) and 0 <= self.threshold_beta < 1,
                "threshold_beta", self.threshold_beta, "must be in [0, 1)")


class BatchTopKState(KindState):
    """Each member's inference threshold (``threshold`` [K], float64 as SAELens; -1 until
    estimated), this batch's smallest kept value (``batch_min``) and, per batch size, the
    host ints of the selection (cached)."""

    def __init__(self, options: BatchTopKOptions, targets: list[float], cfg: Any) -> None:
        super().__init__(options, targets, cfg)
        k = len(targets)
        self.register_buffer("threshold", torch.full((k,), -1.0, dtype=torch.float64))
        self.register_buffer("batch_min", torch.zeros(k, dtype=torch.float64),
                             persistent=False)
        self.keep_by_batch: dict[int, tuple[int, torch.Tensor]] = {}


@register_kind
class BatchTopK(_Sparse):
    """The round(t_k * B) largest relu(pre) of the batch; an EMA inference threshold."""

    name, label, saelens_architecture = "batchtopk", "BatchTopK", "jumprelu"
    Options, State = BatchTopKOptions, BatchTopKState
    fixed_k = baseline = True
    style = {"color": "#8c8c8c", "ls": "-", "marker": "p"}

    @staticmethod
    def _top(model: nn.Module, pre: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(values [K, n_max] sorted descending, flat positions, keep mask [K, n_max]);
        records each member's smallest kept positive value in ``batch_min``."""
        state, n_tok = model.state, pre.shape[1]
        if n_tok not in state.keep_by_batch:  # host ints per batch size; cached
            ns = [max(1, round(t * n_tok)) for t in state.targets]
            keep = torch.arange(max(ns)).unsqueeze(0) < torch.tensor(ns).unsqueeze(1)
            state.keep_by_batch[n_tok] = (max(ns), keep.to(pre.device))
        n_max, keep = state.keep_by_batch[n_tok]
        vals, idx = pre.relu_().flatten(1).topk(n_max, dim=-1)
        with torch.no_grad():
            kept = torch.where(keep & (vals > 0), vals, float("inf")).amin(dim=-1)
            state.batch_min.copy_(kept)
        return vals, idx, keep

    def activate(self, model: nn.Module, pre: torch.Tensor) -> torch.Tensor:
        vals, idx, keep = self._top(model, pre)
        k, b, d = pre.shape
        return _keep_sorted_head(vals, idx, keep, torch.Size((k, b * d))).view_as(pre)

    def activate_fixed(self, model: nn.Module, pre: torch.Tensor) -> FixedKFeatures:
        """n_max values per member, sorted by position (so grouped by token); the sort
        runs on int32 keys where positions fit (faster than int64)."""
        vals, idx, keep = self._top(model, pre)
        k, b, d = pre.shape
        index, order = (idx.int() if b * d < 2**31 else idx).sort(dim=-1)
        return FixedKFeatures((vals * keep).gather(-1, order), index.long(), (k, b, d))

    def fixed_k_l0(self, model: nn.Module) -> float:
        return max(model.state.targets)

    @torch.no_grad()
    def after_step(self, model: nn.Module, trained: torch.Tensor) -> None:
        state = model.state
        beta, theta = state.options.threshold_beta, state.threshold
        seen = torch.isfinite(state.batch_min) & trained
        ema = torch.where(theta < 0, state.batch_min,
                          beta * theta + (1 - beta) * state.batch_min)
        theta.copy_(torch.where(seen, ema, theta))

    def export(self, model: nn.Module, k: int) -> dict[str, Any]:
        theta = model.state.threshold[k].clamp_min(0.0).float()
        return {**super().export(model, k), "architecture": "jumprelu",
                "threshold": theta.expand(model.cfg.d_sae).clone()}

    def log_fields(self, ctx: StepContext) -> list[dict[str, float]]:
        return [{"threshold": v} for v in ctx.state.threshold.tolist()]
