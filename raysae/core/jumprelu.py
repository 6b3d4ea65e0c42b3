"""The JumpReLU SAE kind, made to reach its target L0 in a short run.

f = relu(pre) * (pre > theta) with a learned threshold theta per feature; the sparsity loss
is lambda_k * L0 (the count of active features), whose gradient reaches theta through a
straight-through estimator: the derivative of the step at pre = theta replaced by a rectangle
kernel of width ``bandwidth`` (Rajamanoharan et al. 2024; SAELens, dictionary_learning). The
reconstruction loss reaches theta the same way through the jump of f.

Why SAELens's and dictionary_learning's settings do not reach a target in raysae's budgets:
thresholds start at 0.001 and Adam moves them by about one learning rate per step, so a run
of a thousand steps ends with its L0 wherever the initial thresholds put it
(benchmarks/kind_l0_check.py measures where a kind lands). Here, instead:

- **thresholds start at the target**: on the first batch every feature of member k gets the
  threshold that keeps round(t_k * B) of the batch's pre-activations, so L0 starts at t_k;
- **a calibration holds L0 at the target at every step**: the thresholds in use are
  theta_i + delta_k * r_k (r_k: the RMS of member k's first-batch pre-activations), and
  delta_k follows an integral controller on the batch's L0 (``offset_gain`` * ln(L0 / t_k)
  per step). L0 answers a shift of every threshold within the same step (it is a tail count
  of the pre-activations), so this loop is first order and settles in a few steps.
  Steering lambda alone does not: lambda moves theta only through Adam's momentum, an
  integrator behind an integrator, and L0 oscillates;
- **lambda takes over from the calibration**: lambda_k (the L0 penalty's coefficient, the
  Lagrange multiplier of the L0 budget) grows while delta_k > 0 (the learned thresholds are
  too low for the budget) and shrinks while delta_k < 0, through the trainer's controller
  (``lambda_error``), so the per-feature thresholds come to carry the sparsity and delta_k
  returns towards 0;
- **the bandwidth is scaled to the pre-activations**: ``bandwidth_frac`` times the RMS of
  member k's first-batch pre-activations (an absolute 0.001 is a hair's width on inputs
  normalised to ||x||^2 = d_in: almost no token falls in the kernel, and theta's gradient is
  mostly noise);
- **thresholds move faster than the weights**: theta = ``threshold_scale`` * phi with phi the
  trained parameter, so one Adam step moves theta by about threshold_scale learning rates;
- thresholds stay fp32 (autocast touches matmuls only).

Decoder rows keep unit norm (as TopK's), so a threshold means the same at every step. Saved as
SAELens ``jumprelu`` with the per-feature thresholds. No host sync after the first step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raysae.core.kinds import (
    KindOptions,
    KindState,
    LossTerms,
    SAEKind,
    StepContext,
    register_kind,
)
from raysae.settings import is_number, require


@dataclass(frozen=True)
class JumpReLUOptions(KindOptions):
    bandwidth_frac: float = 0.1
    """The rectangle kernel's width as a fraction of a member's first-batch pre-activation
    RMS."""
    offset_gain: float = 0.1
    """The calibration's step: delta_k += offset_gain * clip(ln(batch L0 / t_k), -1, 1) per
    step while controlling."""
    lambda_follow: float = 0.25
    """lambda's controller error is lambda_follow * delta_k (``JumpReLU.lambda_error``)."""
    threshold_scale: float = 10.0
    """theta = threshold_scale * phi (phi trained by Adam): thresholds move about this many
    learning rates per step."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("bandwidth_frac", "offset_gain", "lambda_follow", "threshold_scale"):
            value = getattr(self, name)
            require(is_number(value) and value > 0, name, value, "must be a number > 0")


def _rectangle(z: torch.Tensor) -> torch.Tensor:
    return ((z > -0.5) & (z < 0.5)).to(z.dtype)


class _JumpReLU(torch.autograd.Function):
    """relu(pre) * (pre > theta); theta's gradient through the rectangle kernel."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta, bandwidth)
        return pre.relu() * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta, bandwidth = ctx.saved_tensors
        grad_pre = grad * ((pre > theta) & (pre > 0))
        kernel = _rectangle((pre - theta) / bandwidth) / bandwidth
        grad_theta = -(theta * kernel * grad).sum(dim=1, keepdim=True)
        return grad_pre, grad_theta, None


class _Step(torch.autograd.Function):
    """(pre > theta) as a number; theta's gradient through the rectangle kernel, none to pre
    (the L0 loss shapes the thresholds, not the encoder)."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta, bandwidth)
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta, bandwidth = ctx.saved_tensors
        kernel = _rectangle((pre - theta) / bandwidth) / bandwidth
        return None, -(kernel * grad).sum(dim=1, keepdim=True), None


class JumpReLUState(KindState):
    """The learned thresholds (``threshold_raw`` [K, d_sae], a parameter), the first batch's
    pre-activation RMS per member (``pre_rms``), whether the thresholds were set from it
    (``threshold_set``; ``ready`` is its host copy, read once), the calibration offset
    delta_k (``offset``) and its next move (``offset_step``)."""

    def __init__(self, options: JumpReLUOptions, targets: list[float], cfg: Any) -> None:
        super().__init__(options, targets, cfg)
        k, d_sae = len(targets), cfg.d_sae
        self.threshold_raw = nn.Parameter(torch.zeros(k, d_sae))
        self.register_buffer("pre_rms", torch.ones(k, 1, 1))
        self.register_buffer("threshold_set", torch.zeros((), dtype=torch.bool))
        self.register_buffer("offset", torch.zeros(k))  # delta_k, in units of pre_rms
        self.register_buffer("offset_step", torch.zeros(k), persistent=False)
        self.ready: bool | None = None


@register_kind
class JumpReLU(SAEKind):
    """Learned per-feature thresholds, lambda * L0 steered by the controller (module doc)."""

    name, label, saelens_architecture = "jumprelu", "JumpReLU", "jumprelu"
    Options, State = JumpReLUOptions, JumpReLUState
    uses_penalty, uses_lambda, uses_controller, sparse_step = False, True, True, False
    baseline, in_default_search = True, False  # one --baselines flag away

    @staticmethod
    def theta(state: JumpReLUState) -> torch.Tensor:
        """[K, 1, d_sae] thresholds in use (fp32): the learned ones plus the calibration."""
        shift = state.offset.view(-1, 1, 1) * state.pre_rms
        return state.options.threshold_scale * state.threshold_raw.float().unsqueeze(1) + shift

    @staticmethod
    def bandwidth(state: JumpReLUState) -> torch.Tensor:
        return state.options.bandwidth_frac * state.pre_rms

    @torch.no_grad()
    def _start(self, state: JumpReLUState, pre: torch.Tensor) -> None:
        """First batch: thresholds keeping round(t_k * B) pre-activations per member, and the
        kernel's bandwidth from the pre-activations' RMS."""
        n_tok, scale = pre.shape[1], state.options.threshold_scale
        flat = pre.detach().float().flatten(1)
        for k, t in enumerate(state.targets):
            kth = flat[k].topk(max(1, round(t * n_tok))).values[-1]
            state.threshold_raw[k].fill_(0.0).add_(kth / scale)
        state.pre_rms.copy_(flat.pow(2).mean(dim=1).sqrt().view(-1, 1, 1))
        state.threshold_set.fill_(True)

    def activate(self, model: nn.Module, pre: torch.Tensor) -> torch.Tensor:
        state = model.state
        if state.ready is None:  # one sync, on the first step (or after a restore)
            state.ready = bool(state.threshold_set)
        if not state.ready:
            self._start(state, pre)
            state.ready = True
        # fp32: thresholds compared and moved at full precision, also under bf16 autocast
        return _JumpReLU.apply(pre.float(), self.theta(state), self.bandwidth(state))

    def loss_terms(self, ctx: StepContext, x, x_hat, f, pre) -> LossTerms:
        state = ctx.state
        l0 = _Step.apply(pre.float(), self.theta(state), self.bandwidth(state)).sum(-1).mean(-1)
        with torch.no_grad():  # the calibration's next move (applied in after_step)
            error = torch.log(l0.detach().clamp_min(0.5) / ctx.targets.float())
            state.offset_step.copy_(state.options.offset_gain * error.clamp(-1.0, 1.0)
                                    * ctx.controlling)
        return LossTerms({"l0": ctx.lam.float() * l0}, l0)

    def lambda_error(self, ctx: StepContext, batch_l0: torch.Tensor) -> torch.Tensor:
        """lambda grows while the calibration raises the thresholds (module doc), at
        ``lambda_follow`` of the controller's pace: lambda moves the thresholds through
        Adam, slowly; followed at full pace it overshot by orders of magnitude."""
        return ctx.state.options.lambda_follow * ctx.state.offset.double()

    @torch.no_grad()
    def after_step(self, model: nn.Module, trained: torch.Tensor) -> None:
        model.state.offset.add_(model.state.offset_step * trained)

    def export(self, model: nn.Module, k: int) -> dict[str, Any]:
        theta = self.theta(model.state)[k, 0].detach().clamp_min(0.0).float()
        return {**super().export(model, k), "threshold": theta.clone()}

    def log_fields(self, ctx: StepContext) -> list[dict[str, float]]:
        state = ctx.state
        means, offsets = self.theta(state).mean(dim=(1, 2)).tolist(), state.offset.tolist()
        return [{"threshold": v, "threshold_offset": o} for v, o in zip(means, offsets,
                                                                          strict=True)]
