"""SAELens's inference architectures as a registry: which tensors an SAE of each holds (their
names and shapes are SAELens's, so ``sae_lens.SAE.load_from_disk`` reads what raysae saves),
which cfg.json fields it adds, how it turns an input into features, and how its decoder
norms fold into the encoder.

``raysae.core.sae.SAE`` holds one of these and never branches on its name: creating,
saving, loading and folding are driven by ``tensors`` and ``fields``. An SAE kind names the
architecture it is saved as (``SAEKind.saelens_architecture``, checked at registration). A
new architecture is one class decorated with ``@register_architecture``.
"""

from __future__ import annotations

from typing import Any

import torch

from raysae.registry import Registry
from raysae.settings import UserError

DIMS = ("d_in", "d_sae")
STANDARD_TENSORS = {"W_enc": ("d_in", "d_sae"), "W_dec": ("d_sae", "d_in"),
                    "b_enc": ("d_sae",), "b_dec": ("d_in",)}


class SAELoadError(UserError):
    """An SAE directory is missing, truncated, or not what it claims to be."""


class Architecture:
    """Base: ``standard``, f = relu((x - b_dec) W_enc + b_enc), x_hat = f W_dec + b_dec."""

    name = "standard"
    tensors: dict[str, tuple[str, ...]] = STANDARD_TENSORS
    """Every tensor of sae_weights.safetensors: name -> shape in d_in / d_sae."""
    buffers: frozenset[str] = frozenset()
    """The tensors that are not trained (``nn.Module`` buffers, e.g. a threshold)."""
    fields: dict[str, type] = {}
    """cfg.json fields of this architecture beyond the common ones (e.g. topk's ``k``)."""

    def check(self, sae: Any, values: dict[str, Any]) -> None:
        """Validate the architecture's fields (``values``) for ``sae``; raise ValueError."""

    def encode(self, sae: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre(sae, x))

    @staticmethod
    def pre(sae: Any, x: torch.Tensor) -> torch.Tensor:
        """(x - b_dec) W_enc + b_enc: what the activation reads."""
        return (x - sae.b_dec) @ sae.W_enc + sae.b_enc

    def fold_norms_(self, sae: Any, norms: torch.Tensor) -> None:
        """Make feature i ``f_i ||d_i||`` (decoder rows then at unit norm, x_hat unchanged):
        scale what produces the feature by ``norms``."""
        sae.W_enc *= norms
        sae.b_enc *= norms

    def cfg_fields(self, sae: Any) -> dict[str, Any]:
        """cfg.json fields beyond the common ones."""
        return {name: getattr(sae, name) for name in self.fields}

    def check_cfg(self, cfg: dict[str, Any]) -> str | None:
        """What is wrong with a cfg.json of this architecture, or None."""
        return None


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
    fields = {"k": int}

    def check(self, sae: Any, values: dict[str, Any]) -> None:
        k = values.get("k")
        if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= sae.cfg.d_sae):
            raise ValueError(f"topk needs an integer k in [1, d_sae={sae.cfg.d_sae}]; got {k!r}")

    def encode(self, sae: Any, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre(sae, x)
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


@register_architecture
class JumpReLUArchitecture(Architecture):
    """f = relu(pre) * (pre > threshold), a raw per-feature threshold (SAELens's name)."""

    name = "jumprelu"
    tensors = {**STANDARD_TENSORS, "threshold": ("d_sae",)}
    buffers = frozenset({"threshold"})

    def encode(self, sae: Any, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre(sae, x)
        return pre.relu() * (pre > sae.threshold)

    def fold_norms_(self, sae: Any, norms: torch.Tensor) -> None:
        super().fold_norms_(sae, norms)
        sae.threshold *= norms
