"""How big a job's activation cache is and how often its SAEs read each row: the arithmetic
behind ``--cache-tokens``, kept apart from the job so a preset, the job's messages and the
cluster's disk sizes (docs/cluster.md) all use the same numbers.

An SAE that reads a row twice fits it: its held-out L0 overshoots its target (measured in
the README), so a preset's cache holds its whole token budget."""

from __future__ import annotations

import numpy as np

from raysae.search.config import JobConfig

META_BYTES_PER_ROW = 3.9
"""Bytes of ``.meta.parquet`` (block id, position, token id) per cache row, as measured on
the local default's cache (500,000 rows: 3.89 bytes a row); beside the 1,024 bytes of a
float16 row at width 512 it is under 0.4% of a cache."""


def cache_rows(cfg: JobConfig) -> int:
    """Rows of the cache to build: --cache-tokens, grown to the budget check's longer
    training so that its SAEs see fresh rows, not the same rows twice. Without a budget
    check it is --cache-tokens as given (it grew to --total-tokens before, so a smaller
    --cache-tokens was silently ignored while the job warned of rows read several times)."""
    if not cfg.search.budget_check:
        return cfg.activations.cache_tokens
    return max(cfg.activations.cache_tokens, longest_training(cfg))


def longest_training(cfg: JobConfig) -> int:
    """Tokens the job's longest-trained SAE reads: the budget, or the budget check's."""
    return int(round(cfg.train.total_tokens * max(cfg.search.budget_check or 1.0, 1.0)))


def passes_over_cache(cfg: JobConfig, rows: int | None = None) -> float | None:
    """How many times the job's longest-trained SAE reads each row of its cache (``rows``: a
    given --cache's row count; default: the cache the job builds). 1.0 or less: no row is
    seen twice. None when streaming (--live: every epoch is fresh text)."""
    if cfg.activations.live:
        return None
    return longest_training(cfg) / (rows or cache_rows(cfg))


def cache_bytes(cfg: JobConfig, d_in: int) -> int:
    """Bytes the job's cache takes on a node's disk: its rows at width ``d_in`` in the
    storage dtype, plus their metadata (``META_BYTES_PER_ROW``)."""
    rows = cache_rows(cfg)
    item = np.dtype("float32" if cfg.activations.cache_dtype == "float32" else "float16")
    return int(rows * (d_in * item.itemsize + META_BYTES_PER_ROW))
