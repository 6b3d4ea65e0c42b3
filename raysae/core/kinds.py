"""SAE kinds (a registry beside the penalty registry): how a batched ladder of K SAEs turns
pre-activations into features, what it adds to the reconstruction loss, and how it is saved.

``pre = W_enc (x - b_dec) + b_enc`` is ``[K, B, d_sae]`` (K members, B tokens); member k
has target L0 ``t_k``. A kind is one unit, registered once (``@register_kind``):

- its **options**: a frozen dataclass (``SAEKind.Options``) of documented fields with
  defaults, validated, set per kind with ``TrainConfig.kind_options`` (flags
  ``--KIND-OPTION``), recorded in trials.parquet (``kind_options``) and search.json;
- its **state**: an ``nn.Module`` (``SAEKind.State``, a ``KindState``) that the ladder
  holds as ``model.state``: the kind's buffers and parameters for K members (thresholds,
  masks, gates), checkpointed with the weights;
- its **loss terms**: ``loss_terms`` returns named ``[K]`` terms (``LossTerms``) that the
  trainer adds to each member's reconstruction loss and logs as ``<name>_loss``, and the
  penalty it logs as ``penalty_loss`` (what lambda multiplies, or the auxiliary loss);
- its **inference architecture** (``saelens_architecture``, raysae.core.architectures)
  and ``export``: member k's tensors under that architecture's names.

The kinds: ``relu`` and ``panneal`` here; ``topk`` and ``batchtopk`` (raysae.core.topk),
``jumprelu``, ``matryoshka`` and ``gated`` in modules of their own.

- ``relu``: f = relu(pre); loss + lambda_k * penalty (the study's SAE); the controller
  drives lambda_k to t_k. Saved as SAELens ``standard``.
- ``panneal``: the power penalty with p annealed linearly from 1 to the penalty's p over the
  first ``anneal_frac`` of the controller's window (of training when control_frac is 0),
  then held, so the controller has the rest to settle lambda at the final p. Needs
  ``penalty.name == "power"``. Saved as ``standard``.

Nothing here syncs with the host: masks and thresholds stay device tensors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from raysae.core.fixed_k import FixedKFeatures
from raysae.core.kind_registry import *  # noqa: F403  (the registry's API, re-exported)
from raysae.core.kind_registry import DEFAULT_KIND, KINDS, register_kind
from raysae.core.penalties import is_linear, penalty_per_token, sum_dtype
from raysae.settings import SettingError, check_choices, is_number, require

if TYPE_CHECKING:
    from raysae.core.config import TrainConfig


@dataclass(frozen=True)
class StepContext:
    """One step of a ladder of K SAEs, as the kinds' hooks need it."""

    cfg: TrainConfig
    """The ladder's training config (penalty, SAE shape, schedule)."""
    model: nn.Module
    """The K stacked SAEs (raysae.core.ladder_sae.LadderSAE); the kind's state is
    ``model.state`` and its options ``model.state.options``."""
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
    moving: dict[str, torch.Tensor]
    """The kind's values that change from step to step (``SAEKind.moving``), as 0-dim
    tensors made outside the step, so a compiled step takes them as inputs."""

    @property
    def k(self) -> int:
        """Members in the ladder."""
        return int(self.targets.shape[0])

    @property
    def state(self) -> KindState:
        return self.model.state


class LossTerms(NamedTuple):
    """What a kind adds to each member's loss: ``terms`` (name -> [K], each added and logged
    as ``<name>_loss``) and ``penalty`` ([K], logged as ``penalty_loss``: the sparsity
    measure lambda multiplies, or a kind's auxiliary loss)."""

    terms: dict[str, torch.Tensor]
    penalty: torch.Tensor


@dataclass(frozen=True)
class KindOptions:
    """A kind's options (none here): subclasses declare documented fields with defaults and
    check them in ``__post_init__`` (``raysae.settings.require``)."""

    def __post_init__(self) -> None:
        check_choices(self)

    def record(self) -> str:
        """The options as trials.parquet records them: JSON, every field."""
        return json.dumps(asdict(self), sort_keys=True)


class KindState(nn.Module):
    """A kind's state in a ladder of K members (``model.state``): its ``options`` and the
    buffers and parameters its subclass registers (none here)."""

    def __init__(self, options: KindOptions, targets: list[float], cfg: Any) -> None:
        super().__init__()
        self.options, self.targets = options, list(targets)


CPU_CHUNKS = True
"""Whether the penalty runs in token chunks on the CPU (``_penalty``); benchmarks that count
the CUDA step's ops on a CPU turn it off."""


def _penalty(cfg: TrainConfig, f: torch.Tensor, params: dict[str, float]) -> torch.Tensor:
    """Per-token penalty [K, B]. On CPU in token chunks of ~2 MB so that the penalty's
    elementwise passes and their backward run in cache rather than in memory."""
    name, floor = cfg.penalty.name, cfg.penalty.grad_floor
    if f.device.type != "cpu" or not CPU_CHUNKS:
        return penalty_per_token(name, f, params, floor, nonnegative=True)
    chunk = max(1, (1 << 19) // (f.shape[0] * f.shape[2]))
    return torch.cat([penalty_per_token(name, part, params, floor, nonnegative=True)
                      for part in f.split(chunk, dim=1)], dim=1)


class SAEKind:
    """Base kind (``relu`` + penalty); subclasses override what differs."""

    name = DEFAULT_KIND
    label = "ReLU"
    Options: type[KindOptions] = KindOptions
    """The kind's options dataclass (module doc)."""
    State: type[KindState] = KindState
    """The kind's state module (module doc)."""
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

    def options(self, overrides: dict[str, Any] | None = None) -> KindOptions:
        """The kind's options: its defaults with ``overrides`` (a SettingError names the
        option as its flag, ``--KIND-OPTION``)."""
        overrides = dict(overrides or {})
        known = {f.name for f in fields(self.Options)}
        for key in overrides:
            require(key in known, option_field(self.name, key), overrides[key],
                    f"kind {self.name!r} has options {sorted(known) or 'none'}",
                    "pass one of them")
        try:
            return self.Options(**overrides)
        except SettingError as err:
            raise SettingError(option_field(self.name, err.field), err.value, err.allowed,
                               err.fix) from None

    def make_state(self, options: KindOptions, targets: list[float], cfg: Any) -> KindState:
        """The kind's state for a ladder with these member ``targets`` (``cfg``: the SAE's
        shape, a raysae.core.config.SAEConfig)."""
        return self.State(options, targets, cfg)

    def family(self, cfg: TrainConfig) -> str:
        """The family name a report shows (relu: the penalty's, e.g. "L1", "sqrt")."""
        return cfg.penalty.family if self.name == DEFAULT_KIND else self.label

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

    def moving(self, cfg: TrainConfig, state: KindState, step: int) -> dict[str, torch.Tensor]:
        """Values of (0-based) ``step`` that change during training (``StepContext.moving``)."""
        return {}

    def loss_terms(self, ctx: StepContext, x, x_hat, f, pre) -> LossTerms:
        """lambda_k * penalty (term ``sparsity``); the recipe says how the penalty sees the
        decoder norms (raysae.core.recipes). f (>= 0) is used in its own dtype: the norms
        are cast to it, so a bf16 step makes no fp32 copy of f; L1 weighted by the norms is
        one batched matrix product."""
        cfg, params, weighting = ctx.cfg, self.penalty_params(ctx), ctx.penalty_weighting
        norms = ctx.model.decoder_norms().to(f.dtype) if weighting != "none" else None
        if is_linear(cfg.penalty.name, params):  # sum_i f_i (||d_i||): no elementwise pass
            pen = (f.sum(dim=-1, dtype=sum_dtype(f)) if norms is None
                   else torch.bmm(f, norms.unsqueeze(-1)).squeeze(-1).float())
        elif weighting == "outside":  # ||d_i|| rho(f_i)
            rho = penalty_per_token(cfg.penalty.name, f.unsqueeze(-1), params,
                                    cfg.penalty.grad_floor, nonnegative=True)
            pen = (rho * norms.unsqueeze(1).float()).sum(dim=-1)
        else:
            pen = _penalty(cfg, f if norms is None else f * norms.unsqueeze(1), params)
        pen = pen.mean(dim=-1)
        return LossTerms({"sparsity": ctx.lam.float() * pen}, pen)

    def active_loss_terms(self, ctx: StepContext, active: Any) -> LossTerms:
        """``loss_terms`` of the sparse step: rho over the active values only (rho(0) = 0)."""
        cfg, weighting, values = ctx.cfg, ctx.penalty_weighting, active.values
        norms = (ctx.model.decoder_norms()[active.member, active.feature]
                 if weighting != "none" else None)
        if weighting == "inside":
            values = values * norms
        rho = penalty_per_token(cfg.penalty.name, values.unsqueeze(-1),
                                self.penalty_params(ctx), cfg.penalty.grad_floor,
                                nonnegative=True)
        if weighting == "outside":
            rho = rho * norms
        pen = active.per_member(rho) / active.shape[1]
        return LossTerms({"sparsity": ctx.lam.float() * pen}, pen)

    def lambda_error(self, ctx: StepContext, batch_l0: torch.Tensor) -> torch.Tensor:
        """[K] the L0 controller's error, float64: ln(batch L0 / target) (clipped by the
        trainer); lambda grows while it is positive."""
        return torch.log(batch_l0.double().clamp_min(0.5) / ctx.targets)

    def after_step(self, model: nn.Module, trained: torch.Tensor) -> None:
        """After the optimiser step; ``trained`` [K] marks members that trained this step."""

    def export(self, model: nn.Module, k: int) -> dict[str, Any]:
        """Member k as its inference architecture: ``SAE(cfg, **export(model, k))``, the
        architecture's name and every tensor and field it declares."""
        return {"architecture": self.saelens_architecture,
                **{n: getattr(model, n)[k] for n in ("W_enc", "W_dec", "b_enc", "b_dec")}}

    def log_fields(self, ctx: StepContext) -> list[dict[str, float]]:
        """Extra per-member log fields (host side; runs on logging steps only)."""
        return [{} for _ in range(ctx.k)]


def option_field(kind: str, option: str) -> str:
    """The setting (and, as ``--kind-option``, the flag) of one kind's option."""
    return f"{kind}_{option}"


def option_fields() -> dict[str, tuple[str, str]]:
    """Every kind option as a setting: ``kind_option`` -> (kind, option)."""
    return {option_field(name, f.name): (name, f.name)
            for name, kind in KINDS.items() for f in fields(kind.Options)}


@register_kind
class ReLUKind(SAEKind):
    """relu(pre) + lambda * penalty, lambda driven by the L0 controller."""


@dataclass(frozen=True)
class PAnnealOptions(KindOptions):
    anneal_frac: float = 0.5
    """Fraction of the controller's window (of training when control_frac is 0) over which
    p goes from 1 to the penalty's p; the controller settles lambda in the rest."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(is_number(self.anneal_frac) and 0 <= self.anneal_frac <= 1, "anneal_frac",
                self.anneal_frac, "must be in [0, 1]")


@register_kind
class PAnneal(SAEKind):
    """The power penalty with p annealed from 1 to the penalty's p (see module doc)."""

    name, label = "panneal", "p-anneal"
    Options = PAnnealOptions
    style = {"color": "#0e8a8a", "ls": "--", "marker": "h"}

    def check(self, cfg: TrainConfig) -> str | None:
        if cfg.penalty.name != "power":
            return f"needs the power penalty (it anneals p), not {cfg.penalty.name!r}"
        return None

    @staticmethod
    def p_at(cfg: TrainConfig, step: int, anneal_frac: float = 0.5) -> float:
        """The exponent used at (0-based) step ``step``."""
        frac = cfg.control_frac if cfg.control_frac > 0 else 1.0
        span = int(cfg.total_steps * frac * anneal_frac)
        p_end = float(cfg.penalty.params["p"])
        return p_end if span <= 0 else 1.0 + (p_end - 1.0) * min(1.0, step / span)

    def moving(self, cfg: TrainConfig, state: KindState, step: int) -> dict[str, torch.Tensor]:
        """p as a 0-dim tensor: it moves every step, and a compiled step takes it as an
        input rather than recompiling for each value."""
        return {"p": torch.tensor(self.p_at(cfg, step, state.options.anneal_frac))}

    def penalty_params(self, ctx: StepContext) -> dict[str, Any]:
        return {**ctx.cfg.penalty.params, "p": ctx.moving["p"]}

    def log_fields(self, ctx: StepContext) -> list[dict[str, float]]:
        return [{"p": float(ctx.moving["p"])} for _ in range(ctx.k)]
