"""Process-wide allocator settings for the CPU training step (glibc only, opt-in)."""

from __future__ import annotations

import ctypes


def keep_freed_memory(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Opt-in, process-wide (glibc only): keep freed blocks below these sizes for reuse.

    By default glibc hands the ladder step's freed [K, B, d_sae] buffers back to the OS
    and page-faults them in again next step, which costs the batched step about as much
    as its elementwise work on CPU (benchmarks/ladder_step.py). Returns False where
    mallopt is unavailable.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, mmap_threshold)
                and libc.mallopt(m_trim_threshold, trim_threshold))
