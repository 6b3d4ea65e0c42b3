"""The shuffled batch reader: torch batches [batch, d_in] from either an activation cache
folder (see `raysae.activations.cache`; memory-mapped, shuffled by shard and row block,
prefetched by a thread, in the stored dtype: see `raysae.activations.reader`) or straight
from the live pipeline (an `ActivationSource`; float32, mixed in a shuffle buffer), with the
same interface, so a trial can train without a cache.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np
import torch

from raysae.activations.cache import open_for_reading
from raysae.activations.harvest import iter_harvest
from raysae.activations.reader import (
    BLOCK_ROWS,
    PREFETCH,
    WINDOW_SHARDS,
    BatchBuffers,
    BatchMaker,
    advise_willneed,
    batch_stream,
    plan_segments,
    prefetched,
)
from raysae.activations.shards import map_shard
from raysae.activations.source import (
    ActivationSource,
    from_storage,
    harvest_order,
    source_block_stream,
)

LIVE_SHUFFLE_BUFFER = 32_768  # rows mixed at once when streaming from the live pipeline


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


def skip_rows(batches: Iterator[torch.Tensor], rows: int) -> Iterator[torch.Tensor]:
    """``batches`` without their first ``rows`` rows (a batch cut there keeps its tail)."""
    for batch in batches:
        if rows >= len(batch):
            rows -= len(batch)
            continue
        yield batch[rows:] if rows else batch
        rows = 0


def _live_batches(source: ActivationSource, batch_size: int, n_tokens: int | None,
                  seed: int, start: int = 0) -> Iterator[torch.Tensor]:
    """The model runs in this process, on its device (a trial's own GPU share, as SAELens's
    activation store does; a Ray Data pool would ask for GPUs and CPUs of its own that the
    trials hold), and each epoch harvests the corpus's next blocks: no token twice until the
    corpus runs out. ``start``: the stream is harvested again from its beginning and its
    first ``start`` rows dropped (the shuffle buffer's order depends on every row before),
    so a restart replays exactly, at the price of harvesting those rows again."""
    epochs = source_block_stream(source)

    def chunks(epoch: int) -> Iterator[np.ndarray]:  # called once per epoch, in order
        blocks = next(epochs)
        order = harvest_order(len(blocks), seed * 1_000_003 + epoch)  # as a cache's
        for batch in iter_harvest(source, blocks, in_process=True, order=order):
            yield from_storage(np.asarray(batch["act"]), source.dtype)

    stream = shuffled_batches(chunks, batch_size, (n_tokens or source.n_tokens) + start,
                              LIVE_SHUFFLE_BUFFER, seed)
    return skip_rows(stream, start) if start else stream


def iter_activation_batches(source: ActivationSource | str | os.PathLike, batch_size: int, *,
                            n_tokens: int | None = None, seed: int = 0, start: int = 0,
                            expect: ActivationSource | None = None,
                            block_rows: int = BLOCK_ROWS, window: int = WINDOW_SHARDS,
                            prefetch: int = PREFETCH, pin_memory: bool | None = None,
                            ) -> Iterator[torch.Tensor]:
    """Shuffled batches [batch_size, d_in] from a cache folder or a live source.

    `n_tokens` rows in all (default: one pass); more than a cache holds loops over it again
    (every row once per epoch), while the live pipeline harvests the corpus's next tokens. `seed`
    fixes the order; `start` begins that many rows into it (a restarted trial continues its
    seed's stream where it stopped: the batches are those an uninterrupted reader gives from
    row `start` on). A cache's batches keep its stored dtype (float32, float16, bfloat16;
    trainers convert on their device); the live pipeline's are float32.
    Cache only: `expect` refuses a cache built with other settings; every shard's checksum is
    checked here, before any batch; `block_rows` / `window` set the shuffle (see
    `raysae.activations.reader`), `prefetch` how many batches a thread prepares ahead, and
    `pin_memory` (default: when CUDA is available) pins the batch buffers.
    """
    if min(batch_size, n_tokens or 1, block_rows, window, prefetch) < 1 or start < 0:
        raise ValueError(f"batch_size={batch_size}, n_tokens={n_tokens}, block_rows="
                         f"{block_rows}, window={window}, prefetch={prefetch} must be >= 1 "
                         f"and start={start} >= 0")
    if isinstance(source, ActivationSource):
        return _live_batches(source, batch_size, n_tokens, seed, start)
    manifest = open_for_reading(source, expect)
    dtype, d_in, shards = manifest["dtype"], manifest["d_in"], manifest["shards"]
    arrays = [map_shard(source, entry, dtype, d_in) for entry in shards]
    total = n_tokens or manifest["n_tokens"]
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory

    def make() -> Iterator[torch.Tensor]:
        def ahead(window_shards: list[int]) -> None:
            for i in window_shards:
                advise_willneed(arrays[i])

        segments = plan_segments([s["rows"] for s in shards], seed, block_rows=block_rows,
                                 window=window, start=start, on_window=ahead)
        buffers = BatchBuffers(d_in, dtype, pin=pin)
        return batch_stream(BatchMaker(arrays, segments, buffers), batch_size, total)

    return prefetched(make, prefetch)
