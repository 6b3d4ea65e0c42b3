"""What opening an activation cache costs a trial: every file hashed (each new process did
this before the per-node stamp) against the node's verified stamp (every trial after the
first on a node), each in a fresh process, as Tune starts trials.

A synthetic float16 cache of ``--gib`` GiB at d = 512 (the pythia-70m preset's width) is
written once under ``--folder``. The file pages stay in the OS page cache here, so the
hashing time is CPU-bound (sha256); on a cloud volume it is bounded by the disk instead
(at a gp3 volume's default 125 MB/s: about 16 s per 2 GB).

    python benchmarks/cache_open.py [--gib 2] [--folder /tmp/raysae-cache-open] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

OPEN = ("import sys, time; from raysae.activations.cache import open_for_reading; "
        "t = time.perf_counter(); open_for_reading(sys.argv[1]); "
        "print(time.perf_counter() - t)")


def build(folder: Path, gib: float) -> Path:
    from raysae.activations.cache import write_arrays_cache

    if (folder / "manifest.json").exists():
        return folder
    rows = int(gib * 1024**3 / (512 * 2))
    acts = np.random.default_rng(0).standard_normal((rows, 512), dtype=np.float32)
    return write_arrays_cache(folder, acts.astype(np.float16), "float16", shard_rows=262_144)


def open_seconds(folder: Path) -> float:
    """Seconds one fresh process spends in open_for_reading (checksums included)."""
    out = subprocess.run([sys.executable, "-c", OPEN, str(folder)], capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--folder", default="/tmp/raysae-cache-open")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from raysae.activations.shards import VERIFIED_STAMP

    folder = build(Path(args.folder), args.gib)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 1024**3
    stamp = folder / VERIFIED_STAMP
    hashed, stamped = [], []
    for _ in range(args.runs):
        stamp.unlink(missing_ok=True)
        hashed.append(open_seconds(folder))  # no stamp: hashes every file, writes the stamp
        stamped.append(open_seconds(folder))
        time.sleep(0.1)
    h, s = statistics.median(hashed), statistics.median(stamped)
    print(f"cache {folder}: {size:.2f} GiB")
    print(f"open, every file hashed (before; median of {args.runs}): {h:.3f} s")
    print(f"open, node's stamp (after; median of {args.runs}):       {s:.3f} s")
    print(f"ratio after / before: {s / h:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
