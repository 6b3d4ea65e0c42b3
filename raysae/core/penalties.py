"""The penalty registry: the extension point of raysae.

A penalty maps feature activations ``f`` (ReLU output, ``f >= 0``, shape
``[tokens, d_sae]``) to one scalar per token. Training minimises
``lambda * mean_over_tokens(penalty(f))``. Adding a penalty is one decorated
function; the CLI, the search space and the tests read ``PENALTIES``.

Numerics. ``d/df (s f)^p`` is infinite at ``f = 0`` for ``p < 1``. The value is
computed exactly (``0 ** p == 0``), but the backward pass floors its argument at
``grad_floor`` (on the ``s*f`` scale): the gradient is ``p s max(s f, floor)^(p-1)``.
This keeps every value and gradient finite for every ``p`` in (0, 1] and every
non-negative input (exact zeros, 1e-30, ...), leaves values and gradients exact
wherever ``s f >= grad_floor`` and only caps the pull on tiny activations that a
ReLU is about to zero anyway. Everything is computed in fp32, outside autocast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

DEFAULT_GRAD_FLOOR = 1e-4


@dataclass(frozen=True)
class PenaltyParam:
    """One numeric parameter of a penalty and its allowed range (for validation and search)."""

    name: str
    low: float
    high: float
    default: float
    low_inclusive: bool = False
    high_inclusive: bool = True
    log: bool = False
    doc: str = ""

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
    """A registered penalty: its function, parameters and one-line description."""

    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[PenaltyParam, ...]
    doc: str

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
            if not param.contains(value):
                raise ValueError(
                    f"penalty.{param.name} = {value!r} is out of range for {self.name!r}: "
                    f"allowed {param.range_text()}"
                )
            out[param.name] = float(value)
        return out


PENALTIES: dict[str, PenaltySpec] = {}


def register_penalty(name: str, *params: PenaltyParam) -> Callable:
    """Decorator: register ``fn(f, **params) -> per-token penalty [tokens]`` under ``name``."""

    def wrap(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in PENALTIES:
            raise ValueError(f"penalty {name!r} is already registered")
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else name
        PENALTIES[name] = PenaltySpec(name, fn, tuple(params), doc)
        return fn

    return wrap


def get_penalty(name: str) -> PenaltySpec:
    """Look a penalty up by name; the error lists the registered ones."""
    try:
        return PENALTIES[name]
    except KeyError:
        raise ValueError(
            f"unknown penalty {name!r}; registered penalties: {sorted(PENALTIES)}"
        ) from None


class _FlooredPower(torch.autograd.Function):
    """u ** p with an exact value and a backward pass floored at ``floor`` (see module doc).

    The backward reuses the forward's output (u^(p-1) = u^p / u), so a step costs one
    transcendental pass, not two; p = 0.5 and 0.25 use sqrt, which is cheaper than pow.
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor, p: float, floor: float) -> torch.Tensor:
        if p == 0.5:
            out = u.sqrt()
        elif p == 0.25:
            out = u.sqrt().sqrt()
        else:
            out = u.pow(p)
        ctx.save_for_backward(u, out)
        ctx.p, ctx.floor = p, floor
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        u, out = ctx.saved_tensors
        p, floor = ctx.p, ctx.floor
        if p >= 1:
            return grad_out * p * u.pow(p - 1), None, None
        above = u >= floor
        slope = torch.where(above, out / torch.where(above, u, 1.0), floor ** (p - 1))
        return grad_out * p * slope, None, None


def powered(u: torch.Tensor, p: float, floor: float = DEFAULT_GRAD_FLOOR) -> torch.Tensor:
    """Elementwise ``u ** p`` for ``u >= 0`` with finite gradients for every p in (0, 2]."""
    u = u.clamp_min(0.0)
    if p == 1.0:
        return u
    return _FlooredPower.apply(u, p, floor)


@register_penalty(
    "lp",
    PenaltyParam("p", 0.0, 2.0, 1.0, doc="exponent: 1 = L1, 0.5 = sqrt, 0.25 = sqrt(sqrt)"),
    PenaltyParam("s", 0.0, math.inf, 1.0, high_inclusive=False, log=True,
                 doc="scale inside the power: sqrt(0.1*x) is p=0.5, s=0.1"),
)
def lp(f: torch.Tensor, *, p: float, s: float, grad_floor: float = DEFAULT_GRAD_FLOOR):
    """sum_i (s * f_i) ** p per token."""
    return powered(s * f, p, grad_floor).sum(dim=-1)


@register_penalty("l1")
def l1(f: torch.Tensor, *, grad_floor: float = DEFAULT_GRAD_FLOOR):
    """sum_i f_i per token (lp with p=1, s=1)."""
    return lp(f, p=1.0, s=1.0, grad_floor=grad_floor)


def penalty_per_token(
    name: str, f: torch.Tensor, params: Mapping[str, float],
    grad_floor: float = DEFAULT_GRAD_FLOOR,
) -> torch.Tensor:
    """Evaluate a registered penalty in fp32 with autocast off; returns ``[tokens]``.

    Missing parameters take the registry's defaults; out-of-range ones raise ValueError.
    """
    spec = get_penalty(name)
    with torch.autocast(device_type=f.device.type, enabled=False):
        return spec.fn(f.float(), grad_floor=grad_floor, **spec.validate(params))


KNOWN_FAMILIES = {(1.0, None): "L1", (0.5, 1.0): "sqrt", (0.25, 1.0): "sqrt(sqrt)"}


def penalty_family(name: str, params: Mapping[str, float]) -> str:
    """Family label for analysis: the study's named penalties, otherwise 'searched'.

    For p = 1 the scale only rescales lambda, so every s counts as L1.
    """
    if name == "l1":
        return "L1"
    if name != "lp":
        return name
    p, s = float(params.get("p", 1.0)), float(params.get("s", 1.0))
    if math.isclose(p, 1.0):
        return "L1"
    for (fp, fs), label in KNOWN_FAMILIES.items():
        if fs is not None and math.isclose(p, fp) and math.isclose(s, fs):
            return label
    return "searched"
