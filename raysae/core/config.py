"""Frozen, validated configuration for SAEs and their training.

Every field is documented where it is declared; ``__post_init__`` rejects bad
values with a ValueError that names the field and the allowed range, so a bad
setting fails before any work starts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from raysae.core.penalties import DEFAULT_GRAD_FLOOR, get_penalty, penalty_family


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name} = {value!r} is invalid: allowed {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


@dataclass(frozen=True)
class SAEConfig:
    """Shape of a standard (ReLU, untied, pre-encoder bias) SAE."""

    d_in: int
    """Width of the hooked activation (the LM's d_model for a residual stream)."""
    d_sae: int
    """Number of dictionary features (the study used 4 * d_in)."""

    def __post_init__(self) -> None:
        _require(_is_int(self.d_in) and self.d_in >= 1, "sae.d_in", self.d_in, "an integer >= 1")
        _require(_is_int(self.d_sae) and self.d_sae >= 1, "sae.d_sae", self.d_sae,
                 "an integer >= 1")


@dataclass(frozen=True)
class PenaltyConfig:
    """A registered penalty and its parameters: ``PenaltyConfig("lp", {"p": 0.5, "s": 0.1})``."""

    name: str = "lp"
    """Registry name (see raysae.core.penalties.PENALTIES)."""
    params: dict[str, float] = field(default_factory=dict)
    """Parameter values; missing ones take the registry's defaults."""
    grad_floor: float = DEFAULT_GRAD_FLOOR
    """Backward-pass floor on s*f for p < 1 (keeps gradients finite; see penalties.py)."""

    def __post_init__(self) -> None:
        spec = get_penalty(self.name)
        object.__setattr__(self, "params", spec.validate(dict(self.params)))
        _require(_is_num(self.grad_floor) and self.grad_floor > 0, "penalty.grad_floor",
                 self.grad_floor, "a number > 0")

    @classmethod
    def lp(cls, p: float = 1.0, s: float = 1.0) -> PenaltyConfig:
        return cls("lp", {"p": p, "s": s})

    @property
    def family(self) -> str:
        return penalty_family(self.name, self.params)


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``train_sae`` needs besides the activations."""

    sae: SAEConfig
    """SAE shape."""
    penalty: PenaltyConfig = field(default_factory=PenaltyConfig)
    """Sparsity penalty."""
    lam: float = 1e-3
    """Penalty coefficient lambda (the start value when l0_target is set)."""
    total_tokens: int = 1_000_000
    """Training length in activation vectors (tokens)."""
    batch_size: int = 4096
    """Activations per optimiser step."""
    lr: float = 1e-3
    """Adam learning rate."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    lr_decay_frac: float = 0.2
    """Fraction of steps at the end over which the learning rate decays linearly to 0."""
    lam_warmup_frac: float = 0.05
    """Fraction of steps over which lambda ramps linearly from 0 (ignored when l0_target is set)."""
    normalize_activations: bool = True
    """Scale inputs by one fixed factor so mean ||x||^2 = d_in (as SAELens); folded into the
    weights at the end, so the saved SAE reads raw activations."""
    activation_scale: float | None = None
    """That factor if known (e.g. from an activation cache's manifest); else estimated from the
    first batch."""
    l0_target: float | None = None
    """If set, a feedback controller tunes lambda so the running L0 reaches this target
    during the first ``control_frac`` of training, then freezes lambda."""
    control_frac: float = 0.8
    """Fraction of training during which the L0 controller may change lambda."""
    control_gain: float = 0.02
    """Controller step: ln(lambda) += gain * clip(ln(batch_l0 / l0_target), -1, 1) per step."""
    log_every: int = 50
    """Record metrics every this many steps."""
    dead_window_tokens: int = 1_000_000
    """A feature is counted dead if it did not fire in the last this many tokens (or since the
    start, if fewer were seen)."""
    seed: int = 0
    """Seed for the SAE's initialisation."""
    device: str = "cpu"
    """Torch device for training."""

    def __post_init__(self) -> None:
        _require(isinstance(self.sae, SAEConfig), "sae", self.sae, "an SAEConfig")
        _require(isinstance(self.penalty, PenaltyConfig), "penalty", self.penalty,
                 "a PenaltyConfig")
        _require(_is_num(self.lam) and self.lam >= 0, "lam", self.lam, "a number >= 0")
        _require(_is_int(self.batch_size) and self.batch_size >= 1, "batch_size",
                 self.batch_size, "an integer >= 1")
        _require(_is_int(self.total_tokens) and self.total_tokens >= self.batch_size,
                 "total_tokens", self.total_tokens, f"an integer >= batch_size ({self.batch_size})")
        _require(_is_num(self.lr) and self.lr > 0, "lr", self.lr, "a number > 0")
        for name in ("lr_decay_frac", "lam_warmup_frac", "control_frac"):
            value = getattr(self, name)
            _require(_is_num(value) and 0 <= value <= 1, name, value, "a number in [0, 1]")
        _require(self.activation_scale is None
                 or (_is_num(self.activation_scale) and self.activation_scale > 0),
                 "activation_scale", self.activation_scale, "None or a number > 0")
        _require(self.l0_target is None
                 or (_is_num(self.l0_target) and 0 < self.l0_target <= self.sae.d_sae),
                 "l0_target", self.l0_target, f"None or a number in (0, d_sae={self.sae.d_sae}]")
        _require(_is_num(self.control_gain) and self.control_gain > 0, "control_gain",
                 self.control_gain, "a number > 0")
        _require(_is_int(self.log_every) and self.log_every >= 1, "log_every", self.log_every,
                 "an integer >= 1")
        _require(_is_int(self.dead_window_tokens) and self.dead_window_tokens >= 1,
                 "dead_window_tokens", self.dead_window_tokens, "an integer >= 1")

    @property
    def total_steps(self) -> int:
        return self.total_tokens // self.batch_size

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (for checkpoints and results tables)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        data["sae"] = SAEConfig(**data["sae"])
        data["penalty"] = PenaltyConfig(**data["penalty"])
        if "adam_betas" in data:
            data["adam_betas"] = tuple(data["adam_betas"])
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {sorted(names)}")
        return cls(**data)
