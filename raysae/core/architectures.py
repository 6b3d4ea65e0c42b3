"""SAELens's inference architectures as a registry: how an SAE turns ``pre`` into features,
the extra tensors and cfg.json fields it keeps, and whether its decoder norms can be folded.

``raysae.core.sae.SAE`` holds one of these and never branches on the name; an SAE kind names
the one it is saved as (``SAEKind.saelens_architecture``, checked at registration). A new
architecture is one class decorated with ``@register_architecture``.
"""

from __future__ import annotations

from typing import Any

import torch

from raysae.registry import Registry
from raysae.settings import UserError


class SAELoadError(UserError):
    """An SAE directory is missing, truncated, or not what it claims to be."""


class Architecture:
    """Base: ``standard``, f = relu(pre)."""

    name = "standard"
    tensors: dict[str, tuple[str, ...]] = {}
    """Extra tensors in sae_weights.safetensors beside W_enc, W_dec, b_enc, b_dec: name ->
    shape in terms of d_in / d_sae."""

    def setup(self, sae: Any, k: int | None, threshold: torch.Tensor | None) -> None:
        """Validate the architecture's settings and add its state to ``sae``."""

    def encode(self, sae: Any, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def fold_norms_(self, sae: Any, norms: torch.Tensor) -> None:
        """Scale the architecture's state when feature i becomes ``f_i ||d_i||``."""

    def cfg_fields(self, sae: Any) -> dict[str, Any]:
        """cfg.json fields beyond the common ones."""
        return {}

    def check_cfg(self, cfg: dict[str, Any]) -> str | None:
        """What is wrong with a cfg.json of this architecture, or None."""
        return None

    def load_kwargs(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """SAE keyword arguments from a checked cfg.json."""
        return {}


ARCHITECTURES: Registry[Architecture] = Registry("architecture")


def register_architecture(cls: type[Architecture]) -> type[Architecture]:
    """Class decorator: register one instance under ``cls.name``."""
    ARCHITECTURES.add(cls.name, cls())
    return cls


def get_architecture(name: str) -> Architecture:
    return ARCHITECTURES.get_entry(name)


register_architecture(Architecture)


@register_architecture
class TopKArchitecture(Architecture):
    """f = the k largest pre per token, relu'd, the rest 0."""

    name = "topk"

    def setup(self, sae: Any, k: int | None, threshold: torch.Tensor | None) -> None:
        if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= sae.cfg.d_sae):
            raise ValueError(f"topk needs an integer k in [1, d_sae={sae.cfg.d_sae}]; got {k!r}")
        sae.k = k

    def encode(self, sae: Any, pre: torch.Tensor) -> torch.Tensor:
        vals, idx = pre.topk(sae.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, vals.relu())

    def fold_norms_(self, sae: Any, norms: torch.Tensor) -> None:
        raise ValueError("a topk SAE's decoder norms cannot be folded: its ranking of "
                         "features would change; train it with unit-norm rows")

    def cfg_fields(self, sae: Any) -> dict[str, Any]:
        return {"k": sae.k, "rescale_acts_by_decoder_norm": False}

    def check_cfg(self, cfg: dict[str, Any]) -> str | None:
        k = cfg.get("k")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            return f"field 'k' = {k!r} must be an int >= 1"
        if k > cfg["d_sae"] or cfg.get("rescale_acts_by_decoder_norm"):
            return f"topk needs k <= d_sae and no rescale_acts_by_decoder_norm; got k={k}"
        return None

    def load_kwargs(self, cfg: dict[str, Any]) -> dict[str, Any]:
        return {"k": cfg["k"]}


@register_architecture
class JumpReLUArchitecture(Architecture):
    """f = relu(pre) * (pre > threshold), a raw per-feature threshold (SAELens's name)."""

    name = "jumprelu"
    tensors = {"threshold": ("d_sae",)}

    def setup(self, sae: Any, k: int | None, threshold: torch.Tensor | None) -> None:
        d_sae = sae.cfg.d_sae
        start = torch.zeros(d_sae) if threshold is None else threshold.float().clone()
        sae.register_buffer("threshold", start.reshape(d_sae))

    def encode(self, sae: Any, pre: torch.Tensor) -> torch.Tensor:
        return pre.relu() * (pre > sae.threshold)

    def fold_norms_(self, sae: Any, norms: torch.Tensor) -> None:
        sae.threshold *= norms
