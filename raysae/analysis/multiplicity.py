"""Many comparisons make false winners: the false discovery rate across a report's claims.

A run writes hundreds of comparisons (every label against L1, sqrt and each baseline, per
target L0 and over the ladder). Called one by one on their own 95% intervals, about one in
twenty true nulls would be called. The family is every comparison of one run on one basis
(the claims use ``matched_l0``) that can be called (an interval from seeds), each pair
counted once (sqrt against L1 and L1 against sqrt are one comparison); within it:

- each row's p-value is the one its own interval implies: the smallest alpha at which the
  interval (raysae.analysis.confidence: Cochran-Cox's weighted t quantile over its variance
  terms) excludes 0, so "p < 0.05" and "the 95% interval excludes 0" agree;
- Benjamini-Hochberg at ``q`` (``FDR_Q``, 0.05; scipy's ``false_discovery_control``)
  decides which rows are called (``significant``; the raw call stays as
  ``significant_raw``);
- every row's interval is widened to the false-coverage-rate level ``1 - R q / m``
  (Benjamini and Yekutieli 2005; R called of m; ``1 - q / m`` when none is), so a called
  row's interval excludes 0 and an uncalled one's includes it: no interval contradicts its
  call. The 95% intervals stay as ``ci_low_raw`` and ``ci_high_raw``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

FDR_Q = 0.05
"""The false discovery rate the report's calls are controlled at."""
CALLABLE = ("seeds", "seeds+blocks")
"""Interval kinds that can make a claim (one seed never does: raysae.analysis.confidence)."""


def critical(terms: list[tuple[float, float]], level: float) -> float:
    """Cochran-Cox's critical value at ``level`` for variance terms ``(v, df)``: the t
    quantiles of each term's df weighted by the terms (a negative term weighs negatively)."""
    if not terms:
        return math.nan
    quantiles = [float(stats.t.ppf(0.5 + level / 2, df)) for _, df in terms]
    var = sum(v for v, _ in terms)
    if not var > 0:
        return quantiles[0]
    return sum(v * t for (v, _), t in zip(terms, quantiles, strict=True)) / var


def p_value(mean: float, terms: list[tuple[float, float]]) -> float:
    """The smallest alpha whose (1 - alpha) interval excludes 0 (bisection on the level)."""
    var = sum(v for v, _ in terms) if terms else math.nan
    if not (terms and math.isfinite(mean) and math.isfinite(var)):
        return math.nan
    if not var > 0:
        return 0.0 if mean != 0 else 1.0
    z = abs(mean) / math.sqrt(var)
    if len(terms) == 1:  # one term: the t test itself
        return float(2 * stats.t.sf(z, terms[0][1]))
    low, high = 0.0, 1.0 - 1e-15  # levels: the interval at `low` excludes 0, at `high` not
    if critical(terms, high) < z:
        return 1.0 - high
    for _ in range(60):
        mid = (low + high) / 2
        if critical(terms, mid) < z:
            low = mid
        else:
            high = mid
    return 1.0 - (low + high) / 2


def pair_key(row) -> tuple:
    """One comparison, whichever way it was made: sqrt against L1 and L1 against sqrt at the
    same target L0 (or both over the ladder) share this key."""
    target = row["target_l0"]
    return (frozenset((row["label"], row["reference"])),
            target if math.isfinite(target) else "ladder")


def control(rows: list[dict], q: float = FDR_Q) -> list[dict]:
    """Benjamini-Hochberg calls and false-coverage-rate intervals over ``rows`` (one family;
    each row has ``delta_ce_mean``, ``interval``, ``ci_low``, ``ci_high``, ``significant``
    and its variance terms under ``_terms``); raw values kept as ``*_raw`` (module doc)."""
    family = [r for r in rows if r["interval"] in CALLABLE and r["_terms"]]
    pairs: dict[tuple, list[dict]] = {}  # a comparison made in both directions counts once
    for row in family:
        pairs.setdefault(pair_key(row), []).append(row)
    first = [group[0] for group in pairs.values()]
    pvals = np.array([p_value(r["delta_ce_mean"], r["_terms"]) for r in first])
    adjusted = stats.false_discovery_control(pvals, method="bh") if len(first) else pvals
    called = int((adjusted <= q).sum())
    level = 1.0 - max(called, 1) * q / max(len(first), 1)
    for row in rows:
        row.update(significant_raw=row["significant"], ci_low_raw=row["ci_low"],
                   ci_high_raw=row["ci_high"], p_value=math.nan, p_adjusted=math.nan,
                   ci_level=math.nan)
    for group, p, padj in zip(pairs.values(), pvals, adjusted, strict=True):
        for row in group:
            width = critical(row["_terms"], level) * row["se"]
            row.update(p_value=float(p), p_adjusted=float(padj), significant=bool(padj <= q),
                       ci_low=row["delta_ce_mean"] - width,
                       ci_high=row["delta_ce_mean"] + width, ci_level=level)
    return rows
