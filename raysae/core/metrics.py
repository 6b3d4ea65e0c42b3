"""One definition of every SAE metric raysae reports, and the table that lists them.

Conventions: ``x`` and ``x_hat`` are ``[tokens, d_in]``; ``f`` is ``[tokens, d_sae]``
(non-negative). Scalar metrics are means over tokens and return Python floats.

- l0: mean count of f_i > 0 per token.
- mse: mean over tokens and dimensions of (x - x_hat)^2.
- fvu: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (mean over the tokens given).
- cos_sim: mean cosine similarity between x and x_hat.
- l2_ratio: mean ||x_hat|| / ||x||.
- feature frequency: fraction of tokens where a feature fires (f_i > 0);
  dead: frequency == 0; low-frequency: 0 < frequency < 1e-5.
- median nonzero activation: median of all f_i > 0.

The metrics table (``METRICS``, issue #25) is the one list of result columns: the
evaluator's keys, the results contract's columns, the Pareto analysis, the figures' labels
and directions and the live progress table all read it, so a new reconstruction metric is
one ``@register_metric`` function of (x, x_hat, f) and no edit elsewhere. Plugin modules
(``RAYSAE_PLUGINS``) reach Ray trials the way plugin kinds do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from raysae.registry import Registry

LOW_FREQUENCY = 1e-5
_EPS = 1e-12
PerToken = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
DIRECTIONS = ("lower", "higher")
DIVISORS = ("tokens", "elements", "spread")
"""What a per-token sum is divided by: the token count, tokens x d_in, or the total spread
of x about its mean, sum ||x - mean(x)||^2 (fvu)."""


@dataclass(frozen=True)
class Metric:
    """One results column: how it is shown, compared and (for reconstruction) computed."""

    name: str
    label: str
    direction: str = "lower"
    """Which way is better: "lower" or "higher"."""
    frontier: bool = False
    """Analysed as a Pareto front against L0 (fronts, hypervolume, its own figure)."""
    progress: str | None = None
    """Header of its column in the live progress table; None: not shown there."""
    per_token: PerToken | None = None
    """(x, x_hat, f) -> [tokens], summed on the device; None: computed by the evaluator
    itself (CE) or by the feature statistics."""
    divide_by: str = "tokens"

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS or self.divide_by not in DIVISORS:
            raise ValueError(f"metric {self.name!r}: direction must be one of {DIRECTIONS} "
                             f"and divide_by one of {DIVISORS}")


METRICS: Registry[Metric] = Registry("metric")


def add_metric(metric: Metric) -> Metric:
    """Register a metric (a taken name is refused); table order is the order of every
    derived list."""
    return METRICS.add(metric.name, metric)


def remove_metric(name: str) -> None:
    METRICS.remove(name)


def register_metric(name: str, label: str, **fields) -> Callable[[PerToken], PerToken]:
    """Decorator: register a per-token function of (x, x_hat, f) as a reconstruction metric
    (``fields``: the other Metric fields)."""
    def register(per_token: PerToken) -> PerToken:
        add_metric(Metric(name, label, per_token=per_token, **fields))
        return per_token
    return register


def metric_names() -> tuple[str, ...]:
    return tuple(METRICS)


def label(name: str) -> str:
    """A column's display label (unknown columns: their name)."""
    return METRICS[name].label if name in METRICS else name


def sign(name: str) -> int:
    """+1 when lower is better (unknown columns too), -1 when higher is."""
    return -1 if name in METRICS and METRICS[name].direction == "higher" else 1


def frontier_metrics() -> tuple[str, ...]:
    return tuple(n for n, m in METRICS.items() if m.frontier)


def progress_columns() -> dict[str, str]:
    """Column -> header of the metrics the live progress table shows."""
    return {n: m.progress for n, m in METRICS.items() if m.progress}


def reconstruction_names() -> tuple[str, ...]:
    """The metrics computed from (x, x_hat, f) by per-token sums."""
    return tuple(n for n, m in METRICS.items() if m.per_token is not None)


def _sum_functions() -> list[PerToken]:
    """The distinct per-token functions (mse and fvu share the squared error)."""
    return list(dict.fromkeys(m.per_token for m in METRICS.values() if m.per_token))


def token_sums(x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Each per-token function summed over tokens, float64 [n] on x's device: batches add
    these up on the device and ``from_sums`` turns the total into the metrics."""
    x, x_hat = x.float(), x_hat.float()
    return torch.stack([fn(x, x_hat, f) for fn in _sum_functions()]).double().sum(dim=1)


def from_sums(sums, n_tokens: int, d_in: int, spread: float) -> dict[str, float]:
    """The reconstruction metrics from ``token_sums`` totals (host floats) over n_tokens."""
    index = {fn: i for i, fn in enumerate(_sum_functions())}
    by = {"tokens": n_tokens, "elements": n_tokens * d_in, "spread": max(spread, _EPS)}
    return {m.name: float(sums[index[m.per_token]]) / by[m.divide_by]
            for m in METRICS.values() if m.per_token is not None}


add_metric(Metric("ce_sae", "CE with SAE spliced in (nats)", frontier=True, progress="CE"))
add_metric(Metric("ce_clean", "clean model CE (nats)"))
add_metric(Metric("ce_zero", "CE with the activation zeroed (nats)"))
add_metric(Metric("ce_recovered", "CE recovered", direction="higher"))


@register_metric("l0", "L0 (active features per token)", progress="L0")
def active_count(x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f > 0).float().sum(dim=-1)


@register_metric("fvu", "fraction of variance unexplained", frontier=True, progress="FVU",
                 divide_by="spread")
@register_metric("mse", "MSE", divide_by="elements")
def squared_error(x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x - x_hat).pow(2).sum(dim=-1)


@register_metric("cos_sim", "cos sim (x, x_hat)", direction="higher")
def cosine(x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=_EPS)


@register_metric("l2_ratio", "L2 ratio |x_hat| / |x|")
def norm_ratio(x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(_EPS)


add_metric(Metric("dead_fraction", "fraction of dead features"))
add_metric(Metric("low_freq_fraction", "fraction of features firing on < 1e-5 of tokens"))
add_metric(Metric("median_nonzero", "median nonzero activation", direction="higher"))


def l0(f: torch.Tensor) -> float:
    return (f > 0).float().sum(dim=-1).mean().item()


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return (x - x_hat).float().pow(2).mean().item()


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = x.float(), x_hat.float()
    residual = (x - x_hat).pow(2).sum()
    total = (x - x.mean(dim=0, keepdim=True)).pow(2).sum()
    return (residual / total.clamp_min(_EPS)).item()


def cos_sim(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(x.float(), x_hat.float(), dim=-1,
                                                 eps=_EPS).mean().item()


def l2_ratio(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    norms = x.float().norm(dim=-1).clamp_min(_EPS)
    return (x_hat.float().norm(dim=-1) / norms).mean().item()


def reconstruction_metrics(x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> dict:
    """The table's reconstruction metrics of one batch, in one dict (one host read)."""
    x, x_hat, f = x.detach().float(), x_hat.detach().float(), f.detach()
    spread = (x - x.mean(dim=0, keepdim=True)).pow(2).sum().double().reshape(1)
    host = torch.cat([token_sums(x, x_hat, f), spread]).tolist()
    return from_sums(host[:-1], x.shape[0], x.shape[1], host[-1])


def feature_frequency(f: torch.Tensor) -> torch.Tensor:
    """Fraction of tokens on which each feature fires, ``[d_sae]``."""
    return (f > 0).float().mean(dim=0)


def dead_count(frequency: torch.Tensor) -> int:
    return int((frequency == 0).sum().item())


def low_frequency_count(frequency: torch.Tensor, threshold: float = LOW_FREQUENCY) -> int:
    """Features that fire, but on fewer than ``threshold`` of tokens (dead ones excluded)."""
    return int(((frequency > 0) & (frequency < threshold)).sum().item())


def median_nonzero(f: torch.Tensor) -> float:
    nonzero = f[f > 0]
    return float("nan") if nonzero.numel() == 0 else nonzero.float().median().item()


class FiringCounter:
    """Counts firings per feature across batches, for frequencies over many tokens."""

    def __init__(self, d_sae: int, device: str | torch.device = "cpu"):
        self.counts = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.tokens = 0

    def update(self, f: torch.Tensor) -> None:
        self.counts += (f > 0).sum(dim=0).to(self.counts.dtype)
        self.tokens += f.shape[0]

    def frequency(self) -> torch.Tensor:
        return (self.counts / max(self.tokens, 1)).float()

