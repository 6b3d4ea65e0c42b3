"""Frozen, validated configuration for SAEs and their training.

Every field is documented where it is declared; ``__post_init__`` rejects bad
values with a ValueError that names the field and the allowed range, so a bad
setting fails before any work starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from raysae.core.kind_registry import DEFAULT_KIND, KINDS
from raysae.core.penalties import (
    DEFAULT_GRAD_FLOOR,
    get_penalty,
    penalty_family,
    penalty_label,
)
from raysae.core.recipes import RECIPES
from raysae.settings import check_choices, is_int, is_number, positive_int, require

Switch = Literal["auto", "on", "off"]
"""A step option's values: 'auto' (the default rule; the field's docstring says which), 'on'
always, 'off' never."""



def check_targets(targets, d_sae: float = float("inf"), fix: str = "") -> None:
    """The one check of an L0 ladder (search config, trial, trainer, the job's pre-flight):
    at least one target, each a number in (0, d_sae]; ``fix`` says how (SettingError)."""
    require(bool(targets), "targets", "", "give at least one target L0")
    for t in targets:
        require(is_number(t) and t > 0, "targets", t, "a target L0 must be > 0 (and "
                "<= d_sae)", fix or "pass positive target L0 values")
        require(t <= d_sae, "targets", t, f"a target L0 must be <= d_sae = {d_sae:g}",
                fix or "lower the target or widen the SAE")

@dataclass(frozen=True)
class SAEConfig:
    """Shape of a standard (ReLU, untied, pre-encoder bias) SAE."""

    d_in: int
    """Width of the hooked activation (the LM's d_model for a residual stream)."""
    d_sae: int
    """Number of dictionary features (the study used 4 * d_in)."""

    def __post_init__(self) -> None:
        require(is_int(self.d_in) and self.d_in >= 1, "sae.d_in", self.d_in, "an integer >= 1")
        require(is_int(self.d_sae) and self.d_sae >= 1, "sae.d_sae", self.d_sae,
                 "an integer >= 1")


@dataclass(frozen=True)
class PenaltyConfig:
    """A registered penalty family and its parameters.

    ``PenaltyConfig("power", {"p": 0.5, "eps": 0.01})`` or ``PenaltyConfig.power(0.5, 0.01)``.
    """

    name: str = "power"
    """Registry name (see raysae.core.penalties.PENALTIES)."""
    params: dict[str, float] = field(default_factory=dict)
    """Parameter values; missing ones take the registry's defaults."""
    grad_floor: float = DEFAULT_GRAD_FLOOR
    """Backward-pass floor on f for the pure power (eps = 0) with p < 1, the only case whose
    gradient is infinite at f = 0 (see penalties.py); no other family uses it."""

    def __post_init__(self) -> None:
        spec = get_penalty(self.name)
        object.__setattr__(self, "params", spec.validate(dict(self.params)))
        require(is_number(self.grad_floor) and self.grad_floor > 0, "penalty.grad_floor",
                 self.grad_floor, "a number > 0")

    @classmethod
    def power(cls, p: float = 1.0, eps: float = 0.0) -> PenaltyConfig:
        """The power family ``(f + eps)^p - eps^p``: p=1 is L1, eps=0 the pure power f^p."""
        return cls("power", {"p": p, "eps": eps})

    @property
    def family(self) -> str:
        """The reference label ("L1", "sqrt", ...) or the family name ("power", "tanh", ...)."""
        return penalty_family(self.name, self.params)

    @property
    def label(self) -> str:
        """Short human label, e.g. "L1" or "power(p=0.5, eps=0.01)"."""
        return penalty_label(self.name, self.params)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a ladder (raysae.core.training) needs besides its targets and the
    activations (the job's training flags)."""

    sae: SAEConfig | None = None
    """SAE shape; None in a job's template until the activations' width is known."""
    penalty: PenaltyConfig = field(default_factory=PenaltyConfig)
    """Sparsity penalty."""
    kind: str = DEFAULT_KIND
    """SAE kind (registry raysae.core.kinds): relu + penalty, topk, batchtopk,
    panneal (the power penalty with p annealed from 1 to the penalty's p)."""
    kind_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Options of SAE kinds, by kind: {kind: {option: value}} (each kind's options
    dataclass, raysae.core.kinds; flags --KIND-OPTION, e.g. --jumprelu-bandwidth-frac); an
    option not given keeps its default."""
    lam: float = 1.0
    """Penalty coefficient lambda: the controller's start value (scaled by 1 / rho(1) of the
    penalty) when l0_target is set, else the fixed coefficient."""
    total_tokens: int = 500_000
    """Training tokens (activation vectors) per SAE."""
    batch_size: int = 512
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
    control_frac: float = 1.0
    """Fraction of training during which the L0 controller may change lambda (then frozen).
    1: to the end, since L0 keeps falling while the learning rate decays (README)."""
    control_gain: float = 0.04
    """Controller step: ln(lambda) += gain * clip(ln(batch_l0 / l0_target), -1, 1) per step.
    0.04: large enough to reach every rung in time, small enough not to oscillate (README)."""
    log_every: int = 50
    """Record (and report) metrics every this many steps."""
    dead_window_tokens: int = 1_000_000
    """A feature is counted dead if it did not fire in the last this many tokens (or since the
    start, if fewer were seen)."""
    seed: int = 0
    """Seed of the SAE initialisation and the activation order (and of Optuna's sampler)."""
    device: str = "cpu"
    """Torch device for training."""
    recipe: str = "free_norm"
    """Training recipe of penalty SAEs (registry raysae.core.recipes): 'free_norm' (free
    decoder norms, penalty on f_i ||d_i||, gradient norm clipped at 1), 'saelens' (the same,
    decoder initialised at norm 0.1 as SAELens) or 'study' (unit-norm decoder rows, penalty
    on f, no clipping: the study's SAE, exactly). TopK and BatchTopK always keep unit-norm
    rows."""
    sparse_step: Switch = "auto"
    """Train with a sparse step. relu SAEs (raysae.core.sparse_step: after the encoder, only
    the active features' decoder rows and gradients are touched): 'auto' on CPU while the
    last logging step's mean L0 is at most 1/10 of d_sae, 'on' always (on a GPU it syncs
    every step). TopK and BatchTopK (raysae.core.fixed_k: the kept values decoded by index,
    no sync): 'on' only; 'auto' keeps their dense decoder, which is faster (README, "The GPU
    path"). 'off' never (dense batched matmuls)."""
    autocast_bf16: Switch = "auto"
    """Run the dense step's matmuls in bfloat16 autocast: 'auto' on CUDA (the tensor
    cores' rate; its CE cost is measured by benchmarks/precision_quality.py,
    docs/performance.md), 'on' everywhere (on CPU: to check its effect on CE), 'off' never.
    The penalty, the loss and the master weights stay fp32."""
    compile: Literal["off", "on"] = "off"
    """Compile the dense step's forward, its loss terms and its backward with
    torch.compile (Inductor), once per trial process (its seconds reported as
    ``compile_seconds``): 'on', or 'off' (eager, the reference in tests). The relu sparse
    step is never compiled (on a CPU pair 'on' with --sparse-step off). Off by default:
    whether it pays depends on the kind and the device (benchmarks/compile_check.py;
    docs/performance.md)."""
    tf32: bool = True
    """Let CUDA matmuls use TF32 (Ampere and later) during training steps; no effect on
    CPU. Evaluation (spliced CE) always runs at full fp32."""

    def __post_init__(self) -> None:
        require(self.sae is None or isinstance(self.sae, SAEConfig), "sae", self.sae,
                "an SAEConfig")
        require(isinstance(self.penalty, PenaltyConfig), "penalty", self.penalty,
                "a PenaltyConfig")
        require(self.kind in KINDS, "kind", self.kind, f"must be one of {sorted(KINDS)}")
        problem = KINDS[self.kind].check(self)
        require(problem is None, "kind", self.kind, problem or "",
                "pick another {kind} or penalty")
        for name, values in self.kind_options.items():
            require(name in KINDS, "kind_options", name, f"options are for registered kinds: "
                    f"{sorted(KINDS)}", "name one of them")
            KINDS[name].options(values)  # a SettingError names the option's flag
        require(is_number(self.lam) and self.lam >= 0, "lam", self.lam, "must be a number >= 0")
        positive_int(self, "batch_size", "total_tokens", "log_every", "dead_window_tokens")
        require(self.total_tokens >= self.batch_size, "total_tokens", self.total_tokens,
                f"smaller than one batch ({{batch_size}} {self.batch_size})",
                "raise {total_tokens} or lower {batch_size}")
        require(is_number(self.lr) and self.lr > 0, "lr", self.lr, "must be a number > 0")
        for name in ("lr_decay_frac", "lam_warmup_frac", "control_frac"):
            value = getattr(self, name)
            require(is_number(value) and 0 <= value <= 1, name, value, "must be in [0, 1]")
        require(self.activation_scale is None
                or (is_number(self.activation_scale) and self.activation_scale > 0),
                "activation_scale", self.activation_scale, "must be None or a number > 0")
        d_sae = self.sae.d_sae if self.sae else float("inf")
        require(self.l0_target is None
                or (is_number(self.l0_target) and 0 < self.l0_target <= d_sae),
                "l0_target", self.l0_target, f"must be None or in (0, d_sae={d_sae}]")
        require(is_number(self.control_gain) and self.control_gain > 0, "control_gain",
                self.control_gain, "must be a number > 0")
        require(self.recipe in RECIPES, "recipe", self.recipe,
                f"must be one of {sorted(RECIPES)}")
        check_choices(self)
        require(isinstance(self.tf32, bool), "tf32", self.tf32, "must be true or false")
        require(is_int(self.seed) and self.seed >= 0, "seed", self.seed,
                "must be an integer >= 0", "pass e.g. {seed} 0")

    @property
    def total_steps(self) -> int:
        return self.total_tokens // self.batch_size

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (for checkpoints and results tables)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        data["sae"] = SAEConfig(**data["sae"]) if data.get("sae") else None
        data["penalty"] = PenaltyConfig(**data["penalty"])
        if isinstance(data.get("autocast_bf16"), bool):  # before "auto": true/false
            data["autocast_bf16"] = "on" if data["autocast_bf16"] else "off"
        if "adam_betas" in data:
            data["adam_betas"] = tuple(data["adam_betas"])
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {sorted(names)}")
        return cls(**data)
