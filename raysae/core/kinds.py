"""SAE kinds (a registry beside the penalty registry): how a batched ladder of K SAEs turns
pre-activations into features, what it adds to the reconstruction loss, and how it is saved.

``pre = W_enc (x - b_dec) + b_enc`` is ``[K, B, d_sae]`` (K members, B tokens); member k
has target L0 ``t_k``. Every kind is one registered class (``KINDS``, ``get_kind``):

- ``relu``: f = relu(pre); loss + lambda_k * penalty (the study's SAE); the controller
  drives lambda_k to t_k. Saved as SAELens ``standard``.
- ``topk``: keep the k_k = max(1, round(t_k)) largest relu(pre) per token; no penalty, no
  controller, lambda 0. All K members in one ``topk(max k)`` whose sorted tail beyond k_k is
  masked to 0 (no loop over members). Saved as SAELens ``topk`` with ``k``.
- ``batchtopk``: keep the n_k = round(t_k * B) largest relu(pre) of the whole batch (so a
  fractional t_k works). Inference threshold theta_k: the smallest kept positive value of
  each training batch, averaged by an EMA (first value, then beta = 0.9). SAELens uses
  0.99 and dictionary_learning 0.999 from step 1000, for runs of 10^5 steps; in runs of a few
  hundred steps the kept minimum drifts down while training and 0.99 lags it (inference L0
  7-14% under target at 300-600 steps; 0.9: within 1%). A batch's minimum is an order
  statistic of t_k * B values, so a short window is not noisy. Saved as SAELens
  ``jumprelu`` with theta_k for every feature (as SAELens converts BatchTopK), so
  inference L0 is measured with the threshold.
- ``jumprelu`` (raysae.core.jumprelu): learned per-feature thresholds, lambda * L0, made to
  reach its target in short runs (SAELens's and dictionary_learning's settings do not).
- ``panneal``: the power penalty with p annealed linearly from 1 to the penalty's p over the
  first half of the controller's window (``control_frac / 2`` of training; half of training
  when control_frac is 0), then held, so the controller has the other half to settle
  lambda at the final p. Needs ``penalty.name == "power"``. Saved as ``standard``.
- ``matryoshka`` (raysae.core.matryoshka): BatchTopK (same selection, threshold and saving)
  whose nested dictionary prefixes each also reconstruct x (their MSEs added to the loss).

AuxK (TopK and BatchTopK, on by default as in dictionary_learning and SAELens): the
top ``k_aux = d_in // 2`` relu(pre) among dead features (the trainer's dead window)
reconstruct the detached residual ``x - x_hat`` through W_dec (no bias); the loss
``||e - e_aux||^2 / ||e - mean(e)||^2`` (OpenAI's normalisation) enters with ``AUXK_COEF``
= 1/32; it is 0 for a member with no dead features. A subclass with ``auxk_coef = 0``
registered under a new name turns it off.

TopK and BatchTopK are ``fixed_k``: one topk of a size known on the host picks their kept
values, so training may decode them by index (``activate_fixed``, raysae.core.fixed_k).

Nothing here syncs with the host: masks and thresholds stay device tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from raysae.core.fixed_k import FixedKFeatures
from raysae.core.kind_registry import *  # noqa: F403  (the registry's API, re-exported)
from raysae.core.kind_registry import DEFAULT_KIND, register_kind
from raysae.core.penalties import penalty_per_token

if TYPE_CHECKING:
    from raysae.core.config import TrainConfig

AUXK_COEF = 1 / 32


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


def _penalty(cfg: TrainConfig, f: torch.Tensor, params: dict[str, float]) -> torch.Tensor:
    """Per-token penalty [K, B]. On CPU in token chunks of ~2 MB so that the penalty's
    elementwise passes and their backward run in cache (sqrt: ~8% off the step)."""
    name, floor = cfg.penalty.name, cfg.penalty.grad_floor
    if f.device.type != "cpu":
        return penalty_per_token(name, f, params, floor)
    chunk = max(1, (1 << 19) // (f.shape[0] * f.shape[2]))
    return torch.cat([penalty_per_token(name, part, params, floor)
                      for part in f.split(chunk, dim=1)], dim=1)


class SAEKind:
    """Base kind (``relu`` + penalty); subclasses override what differs."""

    name = DEFAULT_KIND
    label = "ReLU"
    uses_penalty = True
    """Whether the kind's sparsity term is a registered penalty (raysae.core.penalties)."""
    uses_lambda = True
    """Whether it has a sparsity coefficient lambda (else lambda is 0 and never moves)."""
    uses_controller = True
    sparse_step = True
    """Whether f is relu(pre), so the trainer may use raysae.core.sparse_step."""
    fixed_k = False
    """Whether one ``topk`` of a size known on the host picks f's kept values, so the trainer
    may decode them by index with no host sync (``activate_fixed``, raysae.core.fixed_k)."""
    saelens_architecture = "standard"
    baseline = False
    """A reference frontier beside the penalties (no penalty to search; --baselines)."""
    in_default_search = True
    """A baseline a search trains when --baselines is not given."""
    style: dict[str, Any] | None = None
    """Matplotlib style (color, ls, marker) in figures; not inherited (None: a default)."""

    def check(self, cfg: TrainConfig) -> str | None:
        """A reason ``cfg`` cannot train this kind, or None."""
        return None

    def family(self, cfg: TrainConfig) -> str:
        """The family name a report shows (relu: the penalty's, e.g. "L1", "sqrt")."""
        return cfg.penalty.family if self.name == "relu" else self.label

    def setup(self, model: nn.Module, targets: list[float]) -> None:
        """Add this kind's state (thresholds, masks) to a LadderSAE."""

    def activate(self, model: nn.Module, pre: torch.Tensor) -> torch.Tensor:
        """Features f [K, B, d_sae] from pre-activations (may modify ``pre`` in place)."""
        return pre.relu_()

    def activate_fixed(self, model: nn.Module, pre: torch.Tensor) -> FixedKFeatures:
        """``activate``'s kept values by position (kinds with ``fixed_k``; same state
        updates as ``activate``)."""
        raise NotImplementedError(f"kind {self.name!r} has no fixed-k features")

    def fixed_k_l0(self, model: nn.Module) -> float:
        """The most values a member keeps per token (on average over the batch): the
        fixed-k decoder's cost per token (kinds with ``fixed_k``)."""
        raise NotImplementedError(f"kind {self.name!r} has no fixed-k features")

    def penalty_params(self, ctx: StepContext) -> dict[str, float]:
        return ctx.cfg.penalty.params

    def loss_terms(self, ctx: StepContext, x, x_hat, f, pre) -> tuple[torch.Tensor, torch.Tensor]:
        """(term added to each member's reconstruction loss [K], the logged penalty [K]);
        the recipe says how the penalty sees the decoder norms (raysae.core.recipes)."""
        cfg, params, weighting = ctx.cfg, self.penalty_params(ctx), ctx.penalty_weighting
        if weighting == "none":
            pen = _penalty(cfg, f, params)
        elif weighting == "inside":
            pen = _penalty(cfg, f * ctx.model.decoder_norms().unsqueeze(1), params)
        else:  # outside: ||d_i|| rho(f_i)
            rho = penalty_per_token(cfg.penalty.name, f.unsqueeze(-1), params,
                                    cfg.penalty.grad_floor)
            pen = (rho * ctx.model.decoder_norms().unsqueeze(1)).sum(dim=-1)
        pen = pen.mean(dim=-1)
        return ctx.lam.float() * pen, pen

    def active_loss_terms(self, ctx: StepContext, active: Any
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """``loss_terms`` of the sparse step: rho over the active values only (rho(0) = 0)."""
        cfg, weighting, values = ctx.cfg, ctx.penalty_weighting, active.values
        norms = (ctx.model.decoder_norms()[active.member, active.feature]
                 if weighting != "none" else None)
        if weighting == "inside":
            values = values * norms
        rho = penalty_per_token(cfg.penalty.name, values.unsqueeze(-1),
                                self.penalty_params(ctx), cfg.penalty.grad_floor)
        if weighting == "outside":
            rho = rho * norms
        pen = active.per_member(rho) / active.shape[1]
        return ctx.lam.float() * pen, pen

    def lambda_error(self, ctx: StepContext, batch_l0: torch.Tensor) -> torch.Tensor:
        """[K] the L0 controller's error, float64: ln(batch L0 / target) (clipped by the
        trainer); lambda grows while it is positive."""
        return torch.log(batch_l0.double().clamp_min(0.5) / ctx.targets)

    def after_step(self, model: nn.Module, trained: torch.Tensor) -> None:
        """After the optimiser step; ``trained`` [K] marks members that trained this step."""

    def export(self, model: nn.Module, k: int) -> dict[str, Any]:
        """Member k's inference architecture: SAE keyword arguments."""
        return {"architecture": self.saelens_architecture}

    def log_fields(self, ctx: StepContext) -> list[dict[str, float]]:
        """Extra per-member log fields (host side; runs on logging steps only)."""
        return [{} for _ in range(ctx.k)]


@register_kind
class ReLUKind(SAEKind):
    """relu(pre) + lambda * penalty, lambda driven by the L0 controller."""


@register_kind
class PAnneal(SAEKind):
    """The power penalty with p annealed from 1 to the penalty's p (see module doc)."""

    name, label = "panneal", "p-anneal"
    style = {"color": "#0e8a8a", "ls": "--", "marker": "h"}

    def check(self, cfg: TrainConfig) -> str | None:
        if cfg.penalty.name != "power":
            return f"needs the power penalty (it anneals p), not {cfg.penalty.name!r}"
        return None

    @staticmethod
    def p_at(cfg: TrainConfig, step: int) -> float:
        """The exponent used at (0-based) step ``step``."""
        frac = cfg.control_frac if cfg.control_frac > 0 else 1.0
        span = int(cfg.total_steps * frac / 2)
        p_end = float(cfg.penalty.params["p"])
        return p_end if span <= 0 else 1.0 + (p_end - 1.0) * min(1.0, step / span)

    def penalty_params(self, ctx: StepContext) -> dict[str, float]:
        return {**ctx.cfg.penalty.params, "p": self.p_at(ctx.cfg, ctx.step)}

    def log_fields(self, ctx: StepContext) -> list[dict[str, float]]:
        return [{"p": self.p_at(ctx.cfg, ctx.step)} for _ in range(ctx.k)]


def _keep_sorted_head(values: torch.Tensor, idx: torch.Tensor, keep: torch.Tensor,
                      shape: torch.Size) -> torch.Tensor:
    """Scatter ``values`` (sorted descending along -1) into zeros, the tail beyond ``keep``
    masked to 0 (``keep`` is a bool mask broadcast to ``values``)."""
    kept = values * keep
    return torch.zeros(shape, dtype=values.dtype, device=values.device).scatter(-1, idx, kept)


class _Sparse(SAEKind):
    uses_penalty = uses_lambda = uses_controller = sparse_step = False
    auxk_coef = AUXK_COEF

    def loss_terms(self, ctx: StepContext, x, x_hat, f, pre) -> tuple[torch.Tensor, torch.Tensor]:
        aux = self.auxk(ctx, x, x_hat, pre) if self.auxk_coef else x_hat.new_zeros(ctx.k)
        return aux, aux

    def auxk(self, ctx: StepContext, x, x_hat, acts) -> torch.Tensor:
        """AuxK loss [K] (module doc); ``acts`` are relu(pre) [K, B, d_sae]."""
        dead = ctx.dead_mask()  # [K, d_sae] bool
        k_aux = min(ctx.cfg.sae.d_in // 2, acts.shape[-1])
        cand = torch.where(dead.unsqueeze(1), acts, float("-inf"))
        vals, idx = cand.topk(k_aux, dim=-1)
        vals = torch.where(torch.isfinite(vals), vals, 0.0)
        aux_f = torch.zeros_like(acts).scatter(-1, idx, vals)
        e = (x - x_hat).detach()
        l2 = (e - torch.bmm(aux_f, ctx.model.W_dec)).pow(2).sum(-1).mean(-1)
        denom = (e - e.mean(dim=1, keepdim=True)).pow(2).sum(-1).mean(-1)
        return self.auxk_coef * (l2 / denom).nan_to_num(0.0) * dead.any(dim=-1)


@register_kind
class TopK(_Sparse):
    """Top k_k = max(1, round(t_k)) relu(pre) per token."""

    name, label, saelens_architecture = "topk", "TopK", "topk"
    fixed_k = baseline = True
    style = {"color": "#222222", "ls": "-", "marker": "s"}

    def setup(self, model: nn.Module, targets: list[float]) -> None:
        ks = [max(1, round(t)) for t in targets]
        model.topk_ks, model.topk_max = ks, max(ks)
        keep = torch.arange(max(ks)).unsqueeze(0) < torch.tensor(ks).unsqueeze(1)
        model.register_buffer("topk_keep", keep.unsqueeze(1), persistent=False)  # [K, 1, kmax]

    def activate(self, model: nn.Module, pre: torch.Tensor) -> torch.Tensor:
        vals, idx = pre.relu_().topk(model.topk_max, dim=-1)
        return _keep_sorted_head(vals, idx, model.topk_keep, pre.shape)

    def activate_fixed(self, model: nn.Module, pre: torch.Tensor) -> FixedKFeatures:
        """k_max values per token, token-major (each token's in topk order)."""
        k, b, d = pre.shape
        vals, idx = pre.relu_().topk(model.topk_max, dim=-1)  # [K, B, k_max]
        index = idx + torch.arange(0, b * d, d, device=idx.device).unsqueeze(1)
        return FixedKFeatures((vals * model.topk_keep).flatten(1), index.flatten(1),
                              (k, b, d), model.topk_max)

    def fixed_k_l0(self, model: nn.Module) -> float:
        return float(model.topk_max)

    def export(self, model: nn.Module, k: int) -> dict[str, Any]:
        return {"architecture": "topk", "k": model.topk_ks[k]}


@register_kind
class BatchTopK(_Sparse):
    """The round(t_k * B) largest relu(pre) of the batch; an EMA inference threshold."""

    name, label, saelens_architecture = "batchtopk", "BatchTopK", "jumprelu"
    fixed_k = baseline = True
    style = {"color": "#8c8c8c", "ls": "-", "marker": "p"}
    beta = 0.9

    def setup(self, model: nn.Module, targets: list[float]) -> None:
        model.batchtopk_targets, model.batchtopk_keep = list(targets), {}
        k = len(targets)  # theta in float64 (as SAELens); -1: not estimated yet
        model.register_buffer("threshold", torch.full((k,), -1.0, dtype=torch.float64))
        model.register_buffer("batch_min", torch.zeros(k, dtype=torch.float64),
                              persistent=False)

    @staticmethod
    def _top(model: nn.Module, pre: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(values [K, n_max] sorted descending, flat positions, keep mask [K, n_max]);
        records each member's smallest kept positive value in ``batch_min``."""
        n_tok = pre.shape[1]
        if n_tok not in model.batchtopk_keep:  # host ints per batch size; cached
            ns = [max(1, round(t * n_tok)) for t in model.batchtopk_targets]
            keep = torch.arange(max(ns)).unsqueeze(0) < torch.tensor(ns).unsqueeze(1)
            model.batchtopk_keep[n_tok] = (max(ns), keep.to(pre.device))
        n_max, keep = model.batchtopk_keep[n_tok]
        vals, idx = pre.relu_().flatten(1).topk(n_max, dim=-1)
        with torch.no_grad():
            kept = torch.where(keep & (vals > 0), vals, float("inf")).amin(dim=-1)
            model.batch_min.copy_(kept)
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
        return max(model.batchtopk_targets)

    @torch.no_grad()
    def after_step(self, model: nn.Module, trained: torch.Tensor) -> None:
        seen, theta = torch.isfinite(model.batch_min) & trained, model.threshold
        ema = torch.where(theta < 0, model.batch_min,
                          self.beta * theta + (1 - self.beta) * model.batch_min)
        theta.copy_(torch.where(seen, ema, theta))

    def export(self, model: nn.Module, k: int) -> dict[str, Any]:
        theta = model.threshold[k].clamp_min(0.0).float().cpu()
        return {"architecture": "jumprelu",
                "threshold": theta.expand(model.cfg.d_sae).clone()}

    def log_fields(self, ctx: StepContext) -> list[dict[str, float]]:
        return [{"threshold": v} for v in ctx.model.threshold.tolist()]
