"""One definition of every SAE metric raysae reports.

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
"""

from __future__ import annotations

import torch

LOW_FREQUENCY = 1e-5
_EPS = 1e-12


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
    """The per-batch metrics every trial reports, in one dict."""
    return {"l0": l0(f), "mse": mse(x, x_hat), "fvu": fvu(x, x_hat),
            "cos_sim": cos_sim(x, x_hat), "l2_ratio": l2_ratio(x, x_hat)}


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

