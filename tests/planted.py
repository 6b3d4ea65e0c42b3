"""Planted sparse activations for the trainer tests: a known dictionary, known sparsity."""

from __future__ import annotations

import torch


def planted_batches(d_in: int, n_true: int, k_active: int, batch_size: int = 256,
                    seed: int = 1, steps: int | None = None):
    """x = sum of k_active of n_true unit directions, magnitudes in [0.5, 1.5], + noise."""
    d = torch.randn(n_true, d_in, generator=torch.Generator().manual_seed(0))
    d /= d.norm(dim=1, keepdim=True)  # one planted dictionary; seed picks the samples
    g = torch.Generator().manual_seed(seed)
    n = 0
    while steps is None or n < steps:
        idx = torch.rand(batch_size, n_true, generator=g).argsort(dim=1)[:, :k_active]
        mags = torch.rand(batch_size, k_active, generator=g) + 0.5
        x = (mags.unsqueeze(-1) * d[idx]).sum(dim=1)
        yield x + 0.01 * torch.randn(batch_size, d_in, generator=g)
        n += 1
