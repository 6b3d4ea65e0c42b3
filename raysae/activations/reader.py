"""The cache reader: memory-mapped shards, shuffled by shard order and by row blocks, copied
straight into batch buffers by a background thread.

Order: each epoch permutes the shards (a permutation per epoch, from the seed), groups them
into windows of ``window`` shards, cuts the window's shards into blocks of ``block_rows``
contiguous rows and permutes those blocks. Rows were already shuffled within each shard when
it was written, so a block is a random sample of its shard, and a batch mixes blocks from
the whole window. The row stream runs on across epochs; every row comes once per epoch. The
stream is a function of (seed, row index): a reader started ``start`` rows in gives exactly
the rows an uninterrupted reader gives from there (a restarted trial replays its seed's
order, raysae.search.trial.trainable).

Batches: the rows of one batch are copied block by block (plain slice copies, no gather of a
whole buffer) into a fresh batch buffer (pinned with CUDA) in the stored dtype: float16
stays float16, bfloat16 caches come out as torch.bfloat16. The consumer may keep a batch as
long as it likes. A thread fills the next ``prefetch`` batches ahead of the consumer, and
asks the kernel to read the next window's shards ahead.
"""

from __future__ import annotations

import contextlib
import mmap
import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch

from raysae.activations.shards import STORAGE_DTYPE

TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BLOCK_ROWS = 256
WINDOW_SHARDS = 4
PREFETCH = 4
_END, _ERROR = "end", "error"


def plan_segments(shard_rows: list[int], seed: int, *, block_rows: int = BLOCK_ROWS,
                  window: int = WINDOW_SHARDS, start: int = 0,
                  on_window: Callable[[list[int]], None] | None = None,
                  ) -> Iterator[tuple[int, int, int]]:
    """(shard, start, stop) row runs in reading order, epoch after epoch, without end,
    beginning ``start`` rows into it: the order is a function of the seed and the epoch
    alone, so a restarted reader continues exactly where an earlier one stopped (whole
    epochs and windows are skipped by arithmetic, not read). ``on_window`` is called with
    the shards of each window read and of the next one."""
    if block_rows < 1 or window < 1 or start < 0:
        raise ValueError(f"block_rows={block_rows} and window={window} must be >= 1 and "
                         f"start={start} >= 0")
    rows = np.asarray(shard_rows, dtype=np.int64)
    per_epoch = int(rows.sum())
    if per_epoch < 1:
        raise ValueError("the cache holds no rows; rebuild it")
    epoch, skip = divmod(start, per_epoch)
    while True:
        rng = np.random.default_rng([seed % 2**63, epoch])
        order = rng.permutation(len(rows))
        for w in range(0, len(order), window):
            shards = order[w : w + window]
            counts = -(-rows[shards] // block_rows)
            shard = np.repeat(shards, counts)
            first = (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
            first *= block_rows
            perm = rng.permutation(len(shard))  # drawn for every window: the stream's order
            in_window = int(rows[shards].sum())
            if skip >= in_window:
                skip -= in_window
                continue
            if on_window is not None:
                on_window(order[w : w + 2 * window].tolist())
            stop = np.minimum(first + block_rows, rows[shard])
            shard, first, stop = shard[perm], first[perm], stop[perm]
            if skip:  # cut into this window: drop whole runs, then part of one
                ends = np.cumsum(stop - first)
                cut = int(np.searchsorted(ends, skip, side="right"))
                before = int(ends[cut - 1]) if cut else 0
                shard, first, stop = shard[cut:], first[cut:].copy(), stop[cut:]
                first[0] += skip - before
                skip = 0
            yield from zip(shard.tolist(), first.tolist(), stop.tolist())
        epoch += 1


class BatchBuffers:
    """A fresh buffer [rows, d] per batch in a storage dtype: a numpy view to fill and the
    torch tensor handed out (pinned with CUDA: torch's caching host allocator reuses them).
    Measured faster than rotating a pool of buffers (the allocator hands back the buffer the
    consumer has just released, still in cache), and a batch kept by the consumer is never
    written again."""

    def __init__(self, d_in: int, dtype: str, *, pin: bool):
        self.d_in, self.dtype, self.pin = d_in, dtype, pin
        self.np_dtype = STORAGE_DTYPE[dtype]

    def take(self, rows: int) -> tuple[np.ndarray, torch.Tensor]:
        if self.pin:
            t = torch.empty((rows, self.d_in), dtype=TORCH_DTYPE[self.dtype], pin_memory=True)
            raw = t.view(torch.int16) if self.dtype == "bfloat16" else t
            return raw.numpy().view(self.np_dtype), t
        arr = np.empty((rows, self.d_in), self.np_dtype)
        t = torch.from_numpy(arr)
        return arr, t.view(torch.bfloat16) if self.dtype == "bfloat16" else t


class BatchMaker:
    """Assembles batches from (shard, start, stop) runs of memory-mapped shard arrays."""

    def __init__(self, arrays: list[np.ndarray], segments: Iterator[tuple[int, int, int]],
                 buffers: BatchBuffers):
        self.arrays = [a.view(np.ndarray) for a in arrays]  # plain views: cheap slicing
        self.segments, self.buffers = segments, buffers
        self.carry: tuple[int, int, int] | None = None

    def next_batch(self, rows: int) -> torch.Tensor:
        out, batch = self.buffers.take(rows)
        pos, arrays = 0, self.arrays
        while pos < rows:
            shard, start, stop = self.carry or next(self.segments)
            take = min(stop - start, rows - pos)
            # a plain memcpy that releases the GIL while it copies
            np.copyto(out[pos : pos + take], arrays[shard][start : start + take])
            pos += take
            self.carry = (shard, start + take, stop) if start + take < stop else None
        return batch


def advise_willneed(arr: np.ndarray) -> None:
    """Ask the kernel to read a memory-mapped shard ahead (best effort)."""
    handle = getattr(arr, "_mmap", None)
    if handle is not None and hasattr(mmap, "MADV_WILLNEED"):
        with contextlib.suppress(OSError, ValueError):
            handle.madvise(mmap.MADV_WILLNEED)


def batch_stream(maker: BatchMaker, batch_size: int, n_tokens: int) -> Iterator[torch.Tensor]:
    """Exactly ``n_tokens`` rows as batches of ``batch_size`` (only the last may be smaller)."""
    left = n_tokens
    while left > 0:
        rows = min(batch_size, left)
        left -= rows
        yield maker.next_batch(rows)


def _produce(make: Callable[[], Iterator[torch.Tensor]], q: queue.Queue,
             stop: threading.Event) -> None:
    """Fill ``q``; a blocking put (no polling: the consumer's thread is never kept waiting
    for the GIL by a timer here). A closing consumer sets ``stop`` and empties the queue, so
    a put waiting then goes through and the next check of ``stop`` ends the thread."""
    try:
        for batch in make():
            q.put((None, batch))
            del batch  # a batch the consumer has dropped is freed at once
            if stop.is_set():
                return
        q.put((_END, None))
    except BaseException as err:  # handed to the consumer, raised there
        q.put((_ERROR, err))


def prefetched(make: Callable[[], Iterator[torch.Tensor]],
               depth: int = PREFETCH) -> Iterator[torch.Tensor]:
    """The batches of ``make()``, produced by a background thread up to ``depth`` ahead.
    The thread starts on the first ``next``, stops when the generator is closed or garbage
    collected, and its errors are raised here, in the consumer."""
    q: queue.Queue = queue.Queue(max(depth, 1))
    stop = threading.Event()
    thread = threading.Thread(target=_produce, args=(make, q, stop), name="raysae-reader",
                              daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == _END:
                return
            if kind == _ERROR:
                raise item
            yield item
            del item
    finally:
        stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                break
        if thread is not threading.current_thread():  # (closed by a GC run in the producer)
            thread.join(timeout=10)
