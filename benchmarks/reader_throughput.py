"""The activation cache reader against a same-run memcpy of the bytes it delivers, and a
training loop fed by the reader against the same loop fed from memory.

Builds synthetic caches in a temp dir with the real shard writer
(``raysae.activations.cache.write_arrays_cache``): d=512 float16 and d=128 float32, ``--rows``
rows each. Then, interleaved round by round (median of ``--rounds``):

- reader: one pass of ``iter_activation_batches`` over the cache (memory-mapped shards,
  shuffled blocks, prefetch thread; checksums already checked by a first open), every batch
  taken by the consumer;
- memcpy: the same bytes copied batch by batch (torch ``copy_``) from an in-memory array of
  the cache's size into one batch buffer (kept hot in cache: the strictest floor), on one
  thread (as the reader copies) and on ``--threads``;

printed as tokens/s, GB/s and the ratio reader / memcpy (target: >= 0.5 at d=512 float16,
batch 4096). Then ``--train-steps`` steps of an ``LadderTrainer`` (a ``--k``-member ladder)
fed by the reader against the same steps fed from the same batches held in memory, as a
ratio (target: >= 0.9). Like a trial, it first calls ``keep_freed_memory()`` (glibc).

    python benchmarks/reader_throughput.py [--rows 400000] [--batch 4096] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from timing import median_times

from raysae.activations.batches import iter_activation_batches
from raysae.activations.cache import write_arrays_cache
from raysae.activations.reader import BLOCK_ROWS, PREFETCH
from raysae.activations.shards import STORAGE_DTYPE
from raysae.core.config import PenaltyConfig, SAEConfig, TrainConfig
from raysae.core.ladder import LadderTrainer
from raysae.core.memory import keep_freed_memory
from raysae.core.training import drive


def build(root: Path, rows: int, d: int, dtype: str) -> Path:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((rows, d), dtype=np.float32))
    acts = x.to(torch.bfloat16).view(torch.int16).numpy() if dtype == "bfloat16" \
        else x.numpy().astype(STORAGE_DTYPE[dtype])
    start = time.perf_counter()
    path = write_arrays_cache(root / f"d{d}-{dtype}", acts, dtype)
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"built d={d} {dtype}: {rows:,} rows, {size / 1e6:.0f} MB in "
          f"{time.perf_counter() - start:.1f} s ({path})")
    return path


def reader_vs_memcpy(path: Path, rows: int, d: int, dtype: str, args) -> None:
    start = time.perf_counter()
    next(iter_activation_batches(path, args.batch, n_tokens=args.batch))  # checksums, memoized
    print(f"  first open (sha256 of every shard): {time.perf_counter() - start:.2f} s")
    n = rows // args.batch * args.batch
    itemsize = np.dtype(STORAGE_DTYPE[dtype]).itemsize
    src = torch.empty((n, d), dtype=getattr(torch, dtype)).normal_()
    dst = torch.empty((args.batch, d), dtype=src.dtype)
    seed = iter(range(10**6))

    def read():
        for batch in iter_activation_batches(path, args.batch, n_tokens=n, seed=next(seed),
                                             block_rows=args.block_rows, prefetch=args.prefetch):
            del batch

    def memcpy():
        for i in range(0, n, args.batch):
            dst.copy_(src[i : i + args.batch])

    def memcpy_one_thread():  # the reader copies on one thread
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            memcpy()
        finally:
            torch.set_num_threads(threads)

    many = f"memcpy {torch.get_num_threads()} threads"
    times = median_times({"reader": read, "memcpy 1 thread": memcpy_one_thread, many: memcpy},
                         args.rounds, "cpu", warmup=1)
    for what, t in times.items():
        print(f"  {what:<18}{n / t:>14,.0f} tokens/s {n * d * itemsize / t / 1e9:>8.2f} GB/s")
    print(f"  ratio reader / memcpy = {times['memcpy 1 thread'] / times['reader']:.2f} "
          f"(1 thread), {times[many] / times['reader']:.2f} ({many})")


def training(path: Path, d: int, args) -> None:
    steps, b = args.train_steps, args.batch
    cfg = TrainConfig(sae=SAEConfig(d, args.d_sae_mult * d), penalty=PenaltyConfig.power(0.5),
                      batch_size=b, total_tokens=b * steps, device="cpu", log_every=10)
    targets = [8.0 * 2**i for i in range(args.k)]
    held = [x.clone() for x in iter_activation_batches(path, b, n_tokens=b * steps, seed=99)]
    seed = iter(range(10**6))

    def from_reader():
        drive(LadderTrainer(cfg, targets),
              iter_activation_batches(path, b, n_tokens=b * steps, seed=next(seed)))

    def from_memory():
        drive(LadderTrainer(cfg, targets), held)

    times = median_times({"reader": from_reader, "memory": from_memory}, args.train_rounds,
                         "cpu", warmup=1)
    for what, t in times.items():
        print(f"  train fed by {what:<7}{t / steps * 1e3:>9.1f} ms/step "
              f"{b * steps / t:>12,.0f} tokens/s")
    print(f"  ratio training (reader / memory) = {times['memory'] / times['reader']:.2f} "
          f"(K={args.k}, d_sae={args.d_sae_mult * d}, {steps} steps)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block-rows", type=int, default=BLOCK_ROWS)
    parser.add_argument("--prefetch", type=int, default=PREFETCH)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--train-rounds", type=int, default=5)
    parser.add_argument("--k", type=int, default=2, help="ladder members of the trainer")
    parser.add_argument("--d-sae-mult", type=int, default=2)
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--dir", default=None, help="where to build the caches (default: tmp)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory()  # as a trial does (the ladder's large step temporaries)
    print(f"load average {tuple(round(v, 2) for v in os.getloadavg())} on {os.cpu_count()} "
          f"CPUs; threads={torch.get_num_threads()} batch={args.batch} rows={args.rows:,} "
          f"block_rows={args.block_rows} prefetch={args.prefetch} keep_freed_memory={kept}")
    root = Path(tempfile.mkdtemp(prefix="raysae-reader-", dir=args.dir))
    try:
        for d, dtype in ((512, "float16"), (128, "float32")):
            path = build(root, args.rows, d, dtype)
            reader_vs_memcpy(path, args.rows, d, dtype, args)
            if not args.no_train:
                training(path, d, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"load average at the end {tuple(round(v, 2) for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
