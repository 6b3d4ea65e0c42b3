"""The sparse decoder of the fixed-k kinds (TopK, and BatchTopK while training): their kept
values are chosen by one ``topk`` whose size is known on the host, so the decoder can
gather them by index with no host synchronisation, on any device.

A member keeps n values of its ``[B, d_sae]`` features: TopK n = B * k_max (k_max per
token; a member with a smaller k has its sorted tail masked to 0), BatchTopK n =
round(t_max * B) over the whole batch (members with fewer have their tail masked to 0).
``FixedKFeatures`` holds them as ``values [K, n]`` and their flat positions ``index [K, n]``
(``token * d_sae + feature``), grouped by token in ascending token order. ``fixed_k_decode``
is one ``embedding_bag`` over the stacked decoder ``W_dec.view(K * d_sae, d_in)`` (rows
``member * d_sae + feature``, weights ``values``, mode sum; as sparsify's ``eager_decode``),
one bag per (member, token): TopK's bags all hold k_max entries (the 2-D input, no offsets),
BatchTopK's bag starts come from ``searchsorted`` on the sorted bag ids (no ``bincount``,
no ``nonzero``, no ``.item()``). Gradients reach ``values`` (and through the ``topk`` the
encoder) and ``W_dec`` (embedding_bag's own backward). The result equals the dense decoder
``f W_dec + b_dec`` up to the order of float sums: a masked entry or a zero value adds 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class FixedKFeatures(NamedTuple):
    """The kept values of a [K, B, d_sae] batch and where they are (module doc);
    ``values`` carries the encoder's gradient. ``per_token``: the number of entries of
    every token when each holds the same number (TopK: k_max, token-major), else None."""

    values: torch.Tensor
    index: torch.Tensor
    shape: tuple[int, int, int]
    per_token: int | None = None

    def dense(self) -> torch.Tensor:
        """f as a dense [K, B, d_sae] tensor (detached; for metrics on logging steps).
        Positions are distinct within a member, so the scatter is exact."""
        k, b, d = self.shape
        out = self.values.new_zeros(k, b * d)
        return out.scatter_(1, self.index, self.values.detach()).view(k, b, d)

    def fires(self) -> torch.Tensor:
        """[K, d_sae] int32: how many tokens of the batch fire each feature (value > 0);
        a ``scatter_add_`` into zeros of known size (``bincount`` would sync on CUDA)."""
        k, _, d = self.shape
        fired = (self.values.detach() > 0).to(torch.int32)
        return fired.new_zeros(k, d).scatter_add_(1, self.index % d, fired)


def fixed_k_decode(model, feats: FixedKFeatures) -> torch.Tensor:
    """x_hat [K, B, d_in] = the kept values times their decoder rows, plus b_dec."""
    k, b, d_sae = feats.shape
    d_in = model.W_dec.shape[-1]
    weight = model.W_dec.view(k * d_sae, d_in)
    first = torch.arange(k, device=feats.index.device).unsqueeze(1)  # [K, 1]
    rows = feats.index % d_sae + first * d_sae
    values = feats.values.to(weight.dtype)  # bf16 autocast: embedding_bag wants one dtype
    if feats.per_token is not None:  # every bag holds per_token entries
        x_hat = F.embedding_bag(rows.view(k * b, feats.per_token), weight, mode="sum",
                                per_sample_weights=values.view(k * b, feats.per_token))
    else:
        bag = (feats.index // d_sae + first * b).flatten()  # sorted: member, then token
        offsets = torch.searchsorted(bag, torch.arange(k * b, device=bag.device))
        x_hat = F.embedding_bag(rows.flatten(), weight, offsets, mode="sum",
                                per_sample_weights=values.flatten())
    return x_hat.view(k, b, d_in) + model.b_dec.unsqueeze(1)
