"""The shuffled batch reader: float32 torch batches [batch, d_in] from either an activation
cache folder (see `raysae.activations.cache`) or straight from the live pipeline (an
`ActivationSource`), with the same interface, so a trial can train without a cache.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np
import torch

from raysae.activations.cache import iter_cache_chunks, open_cache
from raysae.activations.harvest import iter_harvest
from raysae.activations.source import ActivationSource, from_storage


def shuffled_batches(chunks: Callable[[int], Iterator[np.ndarray]], batch_size: int,
                     n_tokens: int, shuffle_buffer: int, seed: int) -> Iterator[torch.Tensor]:
    """Mix row chunks (epoch by epoch, from `chunks(epoch)`) in a shuffle buffer; yield exactly
    `n_tokens` rows as float32 batches [batch_size, d] (only the last may be smaller)."""
    if batch_size < 1 or n_tokens < 1:
        raise ValueError(f"batch_size={batch_size} and n_tokens={n_tokens} must be >= 1")
    rng = np.random.default_rng(seed)
    pending: list[np.ndarray] = []
    left, size, epoch = n_tokens, 0, 0

    def emit(final: bool) -> list[np.ndarray]:
        nonlocal pending, size, left
        mixed = np.concatenate(pending)
        mixed = mixed[rng.permutation(len(mixed))]
        n_out = min(left, len(mixed))
        if not final:  # keep half a buffer back, to mix with the rows still to come
            n_out = min(left, (len(mixed) - shuffle_buffer // 2) // batch_size * batch_size)
        left, size, pending = left - n_out, len(mixed) - n_out, [mixed[n_out:]]
        return [mixed[i : min(i + batch_size, n_out)] for i in range(0, n_out, batch_size)]

    while left > 0:
        seen = 0
        for chunk in chunks(epoch):
            pending.append(chunk)
            size, seen = size + len(chunk), seen + len(chunk)
            if size >= shuffle_buffer + batch_size:
                for batch in emit(final=False):
                    yield torch.from_numpy(np.ascontiguousarray(batch))
                if left == 0:
                    return
        if seen == 0:
            raise ValueError("the activation source yielded no rows; check its n_tokens / cache")
        epoch += 1
        if size >= left:  # every row still owed is in the buffer
            for batch in emit(final=True):
                yield torch.from_numpy(np.ascontiguousarray(batch))


def iter_activation_batches(source: ActivationSource | str | os.PathLike, batch_size: int, *,
                            n_tokens: int | None = None, shuffle_buffer: int = 32_768,
                            seed: int = 0, expect: ActivationSource | None = None,
                            ) -> Iterator[torch.Tensor]:
    """Shuffled float32 batches [batch_size, d_in] from a cache folder or a live source.

    `n_tokens` rows in all (default: one pass); more than the source holds loops over it
    again (the live pipeline re-runs each epoch). `seed` fixes the order.
    `expect` (cache only) refuses a cache built with other settings.
    """
    if isinstance(source, ActivationSource):
        total = source.n_tokens

        def chunks(epoch: int) -> Iterator[np.ndarray]:
            for batch in iter_harvest(source):
                yield from_storage(np.asarray(batch["act"]), source.dtype)
    else:
        manifest = open_cache(source, expect)
        total = manifest["n_tokens"]

        def chunks(epoch: int) -> Iterator[np.ndarray]:
            yield from iter_cache_chunks(source, manifest, seed=seed + epoch)
    return shuffled_batches(chunks, batch_size, n_tokens or total, shuffle_buffer, seed)
