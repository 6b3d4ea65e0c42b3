"""The benchmarks' shared timer: interleaved rounds, median per series."""

from __future__ import annotations

import time

import torch


def median_times(fns: dict, rounds: int, device: str, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each fn, interleaved round by round so that load from
    other processes hits every series alike (``warmup`` calls of each first)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
