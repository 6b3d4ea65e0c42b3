"""The penalty registry: the extension point of raysae.

A penalty maps feature activations ``f`` (ReLU output, ``f >= 0``) to one scalar per
token, ``sum_i rho(f_i)`` over the last dimension, so ``f`` may be ``[tokens, d_sae]`` or
``[K, tokens, d_sae]`` (a ladder's K members). Training minimises
``lambda * mean_over_tokens(penalty(f))``; lambda is set by the L0 controller (or by the
search). Adding a family is one decorated function with its parameters (allowed range,
searched range, reference points); the CLI, the search space, the report and the tests
read ``PENALTIES``.

Families (the activation scale is the normalised one, mean ||x||^2 = d_in, where median
nonzero activations are 0.3-1.3):

- ``power``: ``rho(f) = (f + eps)^p - eps^p``. ``eps = 0`` is the pure power ``f^p``
  (L1 ``p = 1``, sqrt ``p = .5``, sqrt(sqrt) ``p = .25``). A scale inside a pure power is
  redundant (``lambda (s f)^p = (lambda s^p) f^p``); ``eps`` is a real scale, the knee:
  for ``f << eps`` the penalty is linear with slope ``p eps^(p-1)``, for ``f >> eps`` it
  is ``f^p``. ``p = 1`` is exactly ``f`` for every ``eps``.
- ``tanh``: ``rho(f) = tanh(c f)``, a smooth L0 proxy (Anthropic 2025, unit-norm decoder rows).
- ``log``: ``rho(f) = log(1 + f / eps)``, the ``p -> 0`` limit of the shifted power / p.

Numerics. Everything is computed with autocast off, in fp32 for fp32 features; a bf16 step's
features are evaluated elementwise in bf16 (no fp32 copy of the [K, B, d_sae] tensor) and
summed per token in fp32. Every value and gradient is finite for every non-negative input
(exact zeros, 1e-30, 1e4, ...). The only singular case is the pure power (``eps = 0``) with
``p < 1``: ``d/df f^p`` is infinite at ``f = 0``. There, and only there, the value stays
exact (``0 ** p == 0``) but the backward pass floors its argument at ``grad_floor``: the
gradient is ``p max(f, floor)^(p-1)``. That leaves values and gradients exact wherever
``f >= grad_floor`` and only caps the pull on tiny activations a ReLU is about to zero
anyway. With ``eps > 0`` the gradient ``p (f + eps)^(p-1) <= p eps^(p-1)`` is finite by
construction, and tanh and log are smooth, so ``grad_floor`` does not apply to them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from raysae.registry import Registry

DEFAULT_GRAD_FLOOR = 1e-4
LOW_PRECISION = (torch.bfloat16, torch.float16)
"""Feature dtypes a penalty evaluates in their own precision (``penalty_per_token``)."""


def sum_dtype(f: torch.Tensor) -> torch.dtype:
    """The dtype a penalty sums its features in: fp32 for bf16/fp16, else their own."""
    return torch.float32 if f.dtype in LOW_PRECISION else f.dtype


@dataclass(frozen=True)
class PenaltyParam:
    """One numeric parameter of a penalty: its allowed range and its default searched range.

    ``search`` is the range the search draws from by default (``None``: not searched);
    ``log`` says it is drawn log-uniformly (the family's scale parameters are).
    """

    name: str
    low: float
    high: float
    default: float
    low_inclusive: bool = False
    high_inclusive: bool = True
    log: bool = False
    search: tuple[float, float] | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        if not self.contains(self.default):
            raise ValueError(f"parameter {self.name!r}: default {self.default!r} is outside "
                             f"its allowed range {self.range_text()}")
        if self.search is not None:
            lo, hi = self.search
            if not (self.contains(lo) and self.contains(hi) and lo < hi):
                raise ValueError(f"parameter {self.name!r}: search range {self.search!r} must "
                                 f"be lo < hi inside {self.range_text()}")
            if self.log and lo <= 0:
                raise ValueError(f"parameter {self.name!r}: a log-uniform search range must "
                                 f"be positive, got {self.search!r}")

    def range_text(self) -> str:
        left = "[" if self.low_inclusive else "("
        right = "]" if self.high_inclusive else ")"
        return f"{left}{self.low:g}, {self.high:g}{right}"

    def contains(self, value: float) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            return False
        above = value >= self.low if self.low_inclusive else value > self.low
        below = value <= self.high if self.high_inclusive else value < self.high
        return above and below


@dataclass(frozen=True)
class PenaltySpec:
    """A registered penalty family: its function, parameters, description and reference points.

    ``references`` maps a label (e.g. ``"sqrt"``) to full parameter values; every search
    includes these points.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[PenaltyParam, ...]
    doc: str
    references: dict[str, dict[str, float]] = field(default_factory=dict)

    def validate(self, values: Mapping[str, float]) -> dict[str, float]:
        """Return the full parameter dict (defaults filled) or raise ValueError naming the field."""
        known = {p.name for p in self.params}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"penalty {self.name!r} has no parameter {unknown[0]!r}; "
                f"its parameters are: {sorted(known) or 'none'}"
            )
        out = {}
        for param in self.params:
            value = values.get(param.name, param.default)
            if torch.is_tensor(value) and value.ndim == 0:  # a value that moves in training
                out[param.name] = value  # (p-annealing's p, within its checked range)
                continue
            if not param.contains(value):
                raise ValueError(
                    f"penalty.{param.name} = {value!r} is out of range for {self.name!r}: "
                    f"allowed {param.range_text()}"
                )
            out[param.name] = float(value)
        return out

    def searched_params(self) -> tuple[PenaltyParam, ...]:
        """The parameters the search draws by default (those with a ``search`` range)."""
        return tuple(p for p in self.params if p.search is not None)

    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def param(self, name: str) -> PenaltyParam:
        """One parameter's declaration; unknown names raise ValueError listing the known."""
        for p in self.params:
            if p.name == name:
                return p
        raise ValueError(f"penalty {self.name!r} has no parameter {name!r}; its parameters "
                         f"are: {list(self.param_names()) or 'none'}")


PENALTIES: Registry[PenaltySpec] = Registry("penalty", "penalties")


def register_penalty(
    name: str, *params: PenaltyParam,
    references: Mapping[str, Mapping[str, float]] | None = None,
) -> Callable:
    """Decorator: register ``fn(f, *, grad_floor, **params) -> [...]`` under ``name``.

    ``fn`` gets ``f >= 0`` of any shape ``[..., d_sae]``, in fp32 or (a bf16 step's) bf16,
    and returns ``sum_i rho(f_i)`` over the last dimension, summed in fp32
    (``sum(dim=-1, dtype=sum_dtype(f))``); ``rho(0)`` must be 0. ``references`` are
    labelled parameter points (validated here, defaults filled) that every search includes.
    """

    def wrap(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        PENALTIES.require_free(name)
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else name
        spec = PenaltySpec(name, fn, tuple(params), doc)
        refs = {label: spec.validate(point) for label, point in (references or {}).items()}
        for point in [spec.validate({}), *refs.values()]:  # the sparse step skips zeros
            if float(fn(torch.zeros(1, 1), grad_floor=DEFAULT_GRAD_FLOOR, **point)) != 0.0:
                raise ValueError(f"penalty {name!r} has rho(0) != 0 at {point}; a penalty must "
                                 "vanish at 0 (raysae.core.sparse_step never evaluates zeros)")
        PENALTIES.add(name, PenaltySpec(name, fn, tuple(params), doc, refs))
        return fn

    return wrap


def get_penalty(name: str) -> PenaltySpec:
    """Look a penalty up by name; the error lists the registered ones."""
    return PENALTIES.get_entry(name)


class _FlooredPower(torch.autograd.Function):
    """u ** p with an exact value and a backward pass floored at ``floor`` (see module doc).

    Only the pure power (eps = 0) with p <= 1 needs it. The backward reuses the forward's
    output (u^(p-1) = u^p / u), so a step costs one transcendental pass, not two;
    p = 0.5 and 0.25 use sqrt, which is cheaper than pow. ``p`` may be a 0-dim tensor (a
    value that changes every step, so a compiled step does not recompile): then no
    shortcut is taken.
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor, p, floor: float) -> torch.Tensor:
        moving = torch.is_tensor(p)
        if not moving and p == 0.5:
            out = u.sqrt()
        elif not moving and p == 0.25:
            out = u.sqrt().sqrt()
        else:
            out = u.pow(p)
        ctx.save_for_backward(u, out, *([p] if moving else []))
        ctx.p, ctx.floor = (None if moving else p), floor
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        u, out, *moving = ctx.saved_tensors
        p, floor = moving[0] if moving else ctx.p, ctx.floor
        if not moving and p >= 1:
            return grad_out * p * u.pow(p - 1), None, None
        # p u^(p-1) = p u^p / u, both floored: exact at u >= floor, p floor^(p-1) below it
        if not moving and p == 0.5:  # p u^p / u = p / u^p: one clamp, one division
            return grad_out.div(out.clamp_min(floor**p)).mul_(p), None, None
        return grad_out.mul(out.clamp_min(floor**p)).div_(u.clamp_min(floor)).mul_(p), None, None


def _shifted_power(f: torch.Tensor, p, eps: float, grad_floor: float) -> torch.Tensor:
    """Elementwise ``(f + eps)^p - eps^p`` for ``f >= 0``, finite gradients for p in (0, 2]
    (``p`` a number, or a 0-dim tensor in (0, 1]: a p that moves during training)."""
    if torch.is_tensor(p):
        if eps == 0.0:
            return _FlooredPower.apply(f, p, grad_floor)
        return torch.expm1(torch.log1p(f / eps) * p) * (eps**p)
    if p == 1.0:
        return f  # exactly f for every eps
    if eps == 0.0:
        if p > 1.0:
            return f.pow(p)  # gradient p f^(p-1) is 0 at f = 0: nothing to floor
        return _FlooredPower.apply(f, p, grad_floor)
    # eps^p * ((1 + f/eps)^p - 1) without cancellation: exact to a few ulp for f << eps too.
    return torch.expm1(torch.log1p(f / eps) * p) * (eps**p)


EPS_DOC = ("knee on the normalised activation scale (mean ||x||^2 = d_in; median nonzero "
           "activations are 0.3-1.3): linear with slope p eps^(p-1) below eps, f^p above; "
           "0 is the pure power")


@register_penalty(
    "power",
    PenaltyParam("p", 0.0, 2.0, 1.0, search=(0.1, 1.0),
                 doc="exponent: 1 = L1, 0.5 = sqrt, 0.25 = sqrt(sqrt)"),
    PenaltyParam("eps", 0.0, math.inf, 0.0, low_inclusive=True, high_inclusive=False,
                 log=True, search=(1e-3, 1.0), doc=EPS_DOC),
    references={"L1": {"p": 1.0, "eps": 0.0}, "sqrt": {"p": 0.5, "eps": 0.0},
                "sqrt(sqrt)": {"p": 0.25, "eps": 0.0}},
)
def power(f: torch.Tensor, *, p: float, eps: float, grad_floor: float = DEFAULT_GRAD_FLOOR):
    """sum_i (f_i + eps)^p - eps^p per token (eps = 0: the pure power f^p)."""
    return _shifted_power(f, p, eps, grad_floor).sum(dim=-1, dtype=sum_dtype(f))


@register_penalty(
    "tanh",
    PenaltyParam("c", 0.0, math.inf, 1.0, high_inclusive=False, log=True, search=(0.1, 100.0),
                 doc="scale: tanh(c f) saturates for f >> 1/c (a smooth L0 proxy)"),
)
def tanh(f: torch.Tensor, *, c: float, grad_floor: float = DEFAULT_GRAD_FLOOR):
    """sum_i tanh(c f_i) per token (smooth L0 proxy)."""
    return torch.tanh(f * c).sum(dim=-1, dtype=sum_dtype(f))


@register_penalty(
    "log",
    PenaltyParam("eps", 0.0, math.inf, 0.1, high_inclusive=False, log=True,
                 search=(1e-3, 1.0), doc="knee: linear (slope 1/eps) below eps, log f above"),
)
def log(f: torch.Tensor, *, eps: float, grad_floor: float = DEFAULT_GRAD_FLOOR):
    """sum_i log(1 + f_i / eps) per token (the p -> 0 limit of the shifted power, / p)."""
    return torch.log1p(f / eps).sum(dim=-1, dtype=sum_dtype(f))


def penalty_per_token(
    name: str, f: torch.Tensor, params: Mapping[str, float],
    grad_floor: float = DEFAULT_GRAD_FLOOR, *, nonnegative: bool = False,
) -> torch.Tensor:
    """Evaluate a registered penalty with autocast off, summing over the last dim in fp32.

    ``f`` is ``[..., d_sae]`` (``[tokens, d_sae]`` or ``[K, tokens, d_sae]``); returns
    ``[...]`` in fp32. fp32 features are evaluated in fp32; bf16 or fp16 ones (a bf16 step's)
    in their own dtype, elementwise, with only the sums in fp32: no fp32 copy of f is made.
    Negative inputs count as 0 (``nonnegative``: the caller knows f >= 0, a ReLU's output,
    and no clamp is spent). Missing parameters take the registry's defaults; out-of-range
    ones raise ValueError.
    """
    spec = get_penalty(name)
    values = spec.validate(params)
    if f.dtype not in LOW_PRECISION:
        f = f.float()
    with torch.autocast(device_type=f.device.type, enabled=False):
        f = f if nonnegative else f.clamp_min(0.0)
        return spec.fn(f, grad_floor=grad_floor, **values).float()


def _filled(spec: PenaltySpec, params: Mapping[str, float]) -> dict[str, float]:
    return {p.name: float(params.get(p.name, p.default)) for p in spec.params}


def reference_points() -> list[tuple[str, str, dict[str, float]]]:
    """``(label, penalty name, params)`` of every family's references, in registration order."""
    return [(label, spec.name, dict(point))
            for spec in PENALTIES.values() for label, point in spec.references.items()]


def penalty_family(name: str, params: Mapping[str, float]) -> str:
    """The reference label when ``(name, params)`` is a reference point, else the family name.

    The power family at ``p = 1`` is exactly ``f`` for every eps, so it is always "L1".
    Missing parameters take their defaults; an unregistered name is returned as is.
    """
    spec = PENALTIES.get(name)
    if spec is None:
        return name
    values = _filled(spec, params)
    if name == "power" and math.isclose(values["p"], 1.0):
        return "L1"
    for label, point in spec.references.items():
        if all(math.isclose(values[k], v) for k, v in point.items()):
            return label
    return name


def is_linear(name: str, params: Mapping[str, float]) -> bool:
    """Whether the penalty is ``sum_i f_i`` (the power family at p = 1, L1, for every eps):
    then a weighted penalty is a matrix product, and costs no elementwise pass."""
    p = params.get("p", 1.0)
    return name == "power" and not torch.is_tensor(p) and float(p) == 1.0


def penalty_scale_at_one(name: str, params: Mapping[str, float]) -> float:
    """``rho(1.0)`` of one feature (positive): start the L0 controller at ``lambda0 / rho(1)``."""
    spec = get_penalty(name)
    one = torch.ones(1, 1, dtype=torch.float64)
    with torch.no_grad():
        value = float(spec.fn(one, grad_floor=DEFAULT_GRAD_FLOOR, **spec.validate(params)))
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"penalty {name!r} with {dict(params)} has rho(1) = {value!r}, "
                         "not a positive finite number")
    return value


def penalty_label(name: str, params: Mapping[str, float]) -> str:
    """Short human label: the reference label ("L1", "sqrt") or e.g. "power(p=0.5, eps=0.01)"."""
    family = penalty_family(name, params)
    if family != name:
        return family
    spec = PENALTIES.get(name)
    values = _filled(spec, params) if spec is not None else dict(params)
    return f"{name}({', '.join(f'{k}={v:.4g}' for k, v in values.items())})"
