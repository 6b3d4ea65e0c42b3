"""Paired-seed comparisons of penalties with confidence intervals (pandas/numpy/scipy only).

Input: a trials-like DataFrame, one row per trained SAE, with columns ``family``, ``label``
(one configuration; comparisons are per label, the family is carried), ``seed`` (paired
design: seed r gave every penalty the same SAE init and activation order), ``target_l0``,
``ce_sae``, ``status`` (only ``"finished"`` rows are used) and optionally ``ce_sae_blocks``
(the CE of each held-out block; every SAE evaluated on the same blocks, in the same order).
Rows repeating a (label, seed, target_l0) are averaged. A reference is named by its label
(the reference penalties' label is their family name, "L1", "sqrt"); when no row has that
label, the rows of the family of that name are used if the family has a single label.

The paired difference of a label to a reference at one target L0 is, seed by seed,
``d_r = ce(label, r) - ce(reference, r)`` over the seeds both have; the estimate is their
mean. With per-block CE, ``D[r, b]`` is the same difference on held-out block b.

Interval (95% by default). The estimand is the difference expected over seeds AND over
held-out text. Two noises enter the mean: the seed-to-seed noise, and the held-out set's own
sampling noise, which every seed shares (same blocks), so the spread of d_r over seeds does
not see it. Model ``D[r, b] = mu + a_r + c_b + e_rb`` (seed effect, shared block effect,
seed x block interaction: a crossed two-way random-effects design), R seeds, B blocks:

    Var(mean) = s_a^2 / R + s_c^2 / B + s_e^2 / (R B)
              ~ s_seed^2 / R  +  max(0, MS_B - MS_E) / (R B)

``s_seed^2 / R`` (= MS_R / (R B), df R-1) is the paired t's variance; it estimates
s_a^2 / R + s_e^2 / (R B). The held-out part is the shared block component s_c^2 / B,
estimated from MS_B = R var_b(seed-averaged block difference) (df B-1) less the residual
MS_E (df (R-1)(B-1)), which the seed part already counts; it is dropped when estimated below
zero. (Adding ``var_b / B`` whole would count the interaction twice.) The interval is
``mean +- q se`` with se = sqrt(Var) and q the Cochran-Cox quantile: the mean of each term's
t quantile (its own df) weighted by the term (MS_E's negatively); columns ``se`` and
``t_quantile`` give both. Welch-Satterthwaite df were tried and rejected:
on synthetic data (R = 3, B = 64, seed sd 0.03) they covered 0.92-0.93 (0.90 at R = 2),
because the df are estimated from a 2-df mean square and grow exactly when the seed variance
is underestimated; Cochran-Cox covered 0.94-0.97 across seed-, block- and
interaction-dominated noise (tests/test_confidence.py checks 0.9-0.99).
Special cases (column ``interval``): R = 1 with blocks, ``blocks``: var_b(D) / B with
t(B-1), the held-out noise only, an honest statement about these trained SAEs and not about
the seed population, so never ``significant`` (a claim needs seeds: seed noise at L0 8 is
0.03-0.04 nats, more than the held-out noise); no per-block CE (or blocks of unequal
length), ``seeds``: the paired t; R = 1 without blocks, ``none``: NaN interval, never
significant.

Frontier score (rows with ``target_l0`` NaN): per seed, the mean over the ladder's targets of
the paired difference (and per block likewise), then the same interval. The targets are
every target the label was paired at; only seeds paired at all of them count.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from raysae.analysis.multiplicity import FDR_Q, control, critical
from raysae.results.vocabulary import SELECTION_STAGES, Status

REFERENCES = ("L1", "sqrt")
BASES = ("target", "matched_l0")
"""``target``: both SAEs trained for the same target L0. ``matched_l0``: the label's CE read
off its own ladder at the reference's achieved held-out L0 (per seed, linear in log L0
between the two rungs around it, never beyond its ends), so an L0 miss is not charged as CE."""
KEYS = ("family", "label", "reference", "basis", "target_l0")
COLUMNS = (*KEYS, "n_seeds", "delta_ce_mean", "ci_low", "ci_high", "significant",
           "se", "t_quantile", "interval", "l0_reference", "fresh_seeds_only", "p_value",
           "p_adjusted", "ci_level", "significant_raw", "ci_low_raw", "ci_high_raw")
"""``significant``, ``ci_low``, ``ci_high``: called and widened under false-discovery-rate
control across the basis's comparisons (raysae.analysis.multiplicity); ``*_raw``: each
row's own 95% interval and call."""
PAIRED_COLUMNS = (*KEYS, "seed", "ce", "ce_reference", "delta_ce", "delta_blocks",
                  "l0_reference")
_CELL = ["label", "seed", "target_l0"]


def _as_blocks(value) -> np.ndarray | None:
    """A per-block CE entry (list, array or missing) as a float array, or None."""
    if value is None or (np.ndim(value) == 0 and pd.isna(value)):
        return None
    arr = np.asarray(value, dtype=float).ravel()
    return arr if arr.size and np.isfinite(arr).all() else None


def _mean_blocks(values: Iterable) -> np.ndarray | None:
    arrays = [_as_blocks(v) for v in values]
    if any(a is None for a in arrays) or len({a.size for a in arrays}) != 1:
        return None
    return np.mean(arrays, axis=0)


def _cells(trials: pd.DataFrame) -> pd.DataFrame:
    """Finished rows, one per (label, seed, target_l0): ce and per-block CE averaged."""
    missing = {"family", "label", "seed", "target_l0", "ce_sae", "status"} - set(trials)
    if missing:
        raise ValueError(f"trials lacks columns {sorted(missing)}")
    t = trials[(trials["status"] == Status.FINISHED) & trials["ce_sae"].notna()].copy()
    if "ce_sae_blocks" not in t:
        t["ce_sae_blocks"] = None
    if "l0" not in t:
        t["l0"] = np.nan
    t["seed"] = t["seed"].astype(int)
    t["target_l0"] = t["target_l0"].astype(float)
    rows = [{"label": label, "seed": seed, "target_l0": target,
             "family": g["family"].iloc[0], "ce": float(g["ce_sae"].mean()),
             "blocks": _mean_blocks(g["ce_sae_blocks"]), "l0": float(g["l0"].mean())}
            for (label, seed, target), g in t.groupby(_CELL, sort=True)]
    return pd.DataFrame(rows, columns=[*_CELL, "family", "ce", "blocks", "l0"])


def fresh_replicates(trials: pd.DataFrame) -> tuple[pd.DataFrame, set[str]]:
    """(the rows comparisons use, the labels compared on their selection replicate only).

    A searched proposal was chosen on its seed-0 ladder (``SELECTION_STAGES``), so that replicate
    is biased in its favour (winner's curse); where the confirmation retrained it with fresh
    seeds, only those count. References and baselines keep every seed (nothing chose them).
    A proposal never confirmed keeps its selection rows, flagged (``fresh_seeds_only``
    False in the comparisons)."""
    if "stage" not in trials:
        return trials, set()
    chosen = trials["stage"].isin(SELECTION_STAGES)
    proposals = set(trials.loc[chosen, "label"])
    confirmed = set(trials.loc[~chosen & trials["label"].isin(proposals), "label"])
    keep = ~(chosen & trials["label"].isin(confirmed))
    return trials[keep], proposals - confirmed


def _ladder_at(x: np.ndarray, y: np.ndarray, blocks: list, l0: float):
    """(ce, blocks) of one ladder (log L0 ``x`` ascending, CE ``y``, per-block CE ``blocks``)
    at held-out L0 ``l0``, linear in log L0 between the rungs around it; None outside."""
    if not len(x) or not np.isfinite(l0) or l0 <= 0:
        return None
    at = np.log(l0)
    if at < x[0] - 1e-12 or at > x[-1] + 1e-12:
        return None
    j = int(np.clip(np.searchsorted(x, at), 1, len(x) - 1)) if len(x) > 1 else 0
    i = max(j - 1, 0)
    w = 0.0 if x[j] == x[i] else float(np.clip((at - x[i]) / (x[j] - x[i]), 0.0, 1.0))
    mixed = (None if blocks[i] is None or blocks[j] is None or blocks[i].size != blocks[j].size
             else (1 - w) * blocks[i] + w * blocks[j])
    return (1 - w) * y[i] + w * y[j], mixed


def _reference_label(cells: pd.DataFrame, reference: str) -> str | None:
    if (cells["label"] == reference).any():
        return reference
    labels = cells.loc[cells["family"] == reference, "label"].unique()
    return str(labels[0]) if len(labels) == 1 else None


def paired_differences(trials: pd.DataFrame, reference: str = "L1",
                       basis: str = "target") -> pd.DataFrame:
    """Per-seed paired differences to ``reference`` for every other label and target L0.

    One row per (label, target_l0, seed) both the label and the reference finished:
    ``delta_ce = ce - ce_reference`` and ``delta_blocks`` (per-block difference, or None);
    with ``basis`` ``matched_l0`` the label's CE is read at the reference's achieved L0
    (``BASES``), and a pair whose L0 lies outside the label's ladder is left out.
    """
    return _pairs(_cells(trials), reference, basis)


def _pairs(cells: pd.DataFrame, reference: str, basis: str) -> pd.DataFrame:
    """``paired_differences`` from the trials' cells (``_cells``)."""
    if basis not in BASES:
        raise ValueError(f"basis={basis!r} is not one of {BASES}")
    ref_label = _reference_label(cells, reference)
    if ref_label is None:
        return pd.DataFrame(columns=list(PAIRED_COLUMNS))
    ref = cells[cells["label"] == ref_label]
    ref = ref[["seed", "target_l0", "ce", "blocks", "l0"]].rename(
        columns={"ce": "ce_reference", "blocks": "blocks_reference", "l0": "l0_reference"})
    others = cells[cells["label"] != ref_label]
    if basis == "matched_l0":
        others = _matched(others, ref)
    pairs = others.drop(columns="l0").merge(ref, on=["seed", "target_l0"])
    pairs["reference"], pairs["basis"] = reference, basis
    pairs["delta_ce"] = pairs["ce"] - pairs["ce_reference"]
    pairs["delta_blocks"] = [
        a - b if a is not None and b is not None and a.size == b.size else None
        for a, b in zip(pairs["blocks"], pairs["blocks_reference"], strict=True)]
    pairs = pairs.sort_values(["label", "target_l0", "seed"], ignore_index=True)
    return pairs[list(PAIRED_COLUMNS)]


def _matched(others: pd.DataFrame, ref: pd.DataFrame) -> pd.DataFrame:
    """``others``' cells re-read at the reference's achieved L0 of the same seed and target."""
    rows = []
    for (label, seed), cells in others.groupby(["label", "seed"], sort=False):
        ladder = cells[np.isfinite(cells["l0"]) & (cells["l0"] > 0)].sort_values("l0")
        x, y = np.log(ladder["l0"].to_numpy(float)), ladder["ce"].to_numpy(float)
        blocks = list(ladder["blocks"])
        for _, r in ref[ref["seed"] == seed].iterrows():
            got = _ladder_at(x, y, blocks, r["l0_reference"])
            if got is not None:
                rows.append({"label": label, "seed": seed, "target_l0": r["target_l0"],
                             "family": cells["family"].iloc[0], "ce": got[0],
                             "blocks": got[1], "l0": r["l0_reference"]})
    return pd.DataFrame(rows, columns=[*_CELL, "family", "ce", "blocks", "l0"])


def _terms(d: np.ndarray, blocks: np.ndarray | None) -> tuple[list[tuple[float, float]], str]:
    """Variance terms (Var part of the mean, its df) for ``d`` [R] and ``blocks`` [R, B]."""
    r = d.size
    if blocks is None or blocks.shape[1] < 2:
        return ([(float(d.var(ddof=1)) / r, r - 1.0)] if r >= 2 else []), "seeds"
    b = blocks.shape[1]
    col = blocks.mean(axis=0)
    ms_b = r * float(col.var(ddof=1))
    if r < 2:
        return [(ms_b / b, b - 1.0)], "blocks"
    row = blocks.mean(axis=1)
    ms_r = b * float(row.var(ddof=1))
    resid = blocks - row[:, None] - col[None, :] + blocks.mean()
    df_e = (r - 1.0) * (b - 1.0)
    ms_e = float((resid ** 2).sum()) / df_e
    terms = [(ms_r / (r * b), r - 1.0)]
    if ms_b > ms_e:  # the shared block component s_c^2 / B, when estimated above zero
        terms += [(ms_b / (r * b), b - 1.0), (-ms_e / (r * b), df_e)]
    return terms, "seeds+blocks"


def _interval(d: np.ndarray, blocks: np.ndarray | None, level: float) -> dict:
    """Mean of ``d`` with its interval (see the module docstring)."""
    terms, kind = _terms(d, blocks)
    mean = float(d.mean()) if d.size else np.nan
    var = sum(v for v, _ in terms) if terms else np.nan
    q = critical(terms, level)
    se = float(np.sqrt(var)) if np.isfinite(var) else np.nan
    low, high = mean - q * se, mean + q * se
    ok = bool(np.isfinite(low) and np.isfinite(high))
    return {"n_seeds": int(d.size), "delta_ce_mean": mean, "ci_low": low, "ci_high": high,
            "significant": ok and kind != "blocks" and (low > 0 or high < 0), "se": se,
            "t_quantile": q,
            "interval": kind if ok else "none", "_terms": terms}


def _block_matrix(deltas: pd.Series) -> np.ndarray | None:
    arrays = list(deltas)
    if not arrays or any(a is None for a in arrays) or len({a.size for a in arrays}) != 1:
        return None
    return np.vstack(arrays)


def _frontier(g: pd.DataFrame) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-seed (and per-block) mean over targets, for seeds paired at every target."""
    n_targets = g["target_l0"].nunique()
    per_seed = g.groupby("seed")
    full = [s for s, sg in per_seed if sg["target_l0"].nunique() == n_targets]
    g = g[g["seed"].isin(full)]
    d = g.groupby("seed")["delta_ce"].mean().to_numpy()
    mats = [_block_matrix(sg["delta_blocks"]) for _, sg in g.groupby("seed")]
    blocks = (None if not mats or any(m is None for m in mats)
              or len({m.shape for m in mats}) != 1
              else np.vstack([m.mean(axis=0) for m in mats]))
    return d, blocks


def compare(trials: pd.DataFrame, references: Iterable[str] = REFERENCES,
            level: float = 0.95, bases: Iterable[str] = BASES,
            fdr_q: float = FDR_Q) -> pd.DataFrame:
    """Paired differences to each reference with ``level`` intervals, on each basis.

    One row per (family, label, reference, basis, target_l0), and one per (family, label,
    reference, basis) with ``target_l0`` NaN for the frontier score; columns ``COLUMNS``.
    ``significant_raw``: the row's own ``level`` interval excludes 0; ``significant``, with
    ``ci_low`` and ``ci_high``: the call and interval under false-discovery-rate control
    across every comparison of one basis (raysae.analysis.multiplicity; ``fdr_q``).
    Searched proposals count only the replicates that did not choose them
    (``fresh_replicates``). Empty (with the columns) when no reference has finished rows.
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level} must lie in (0, 1)")
    trials, selection_only = fresh_replicates(trials)
    cells = _cells(trials)
    by_basis: dict[str, list[dict]] = {basis: [] for basis in bases}
    for reference in references:
        for basis in bases:
            rows = by_basis[basis]
            pairs = _pairs(cells, reference, basis)
            for (label, family), g in pairs.groupby(["label", "family"], sort=True):
                key = {"family": family, "label": label, "reference": reference,
                       "basis": basis, "fresh_seeds_only": label not in selection_only}
                for target, tg in g.groupby("target_l0", sort=True):
                    stat = _interval(tg["delta_ce"].to_numpy(float),
                                     _block_matrix(tg["delta_blocks"]), level)
                    rows.append({**key, "target_l0": float(target), **stat,
                                 "l0_reference": float(tg["l0_reference"].mean())})
                rows.append({**key, "target_l0": np.nan, **_interval(*_frontier(g), level),
                             "l0_reference": np.nan})
    rows = [row for family in by_basis.values() for row in control(family, fdr_q)]
    out = pd.DataFrame(rows, columns=list(COLUMNS))
    return out.astype({"target_l0": float, "significant": bool, "significant_raw": bool,
                       "fresh_seeds_only": bool})


def per_seed_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Finished CE per seed: target_l0, label, family and one ``ce_seed_<r>`` column per seed."""
    cells = _cells(trials)
    wide = cells.pivot_table(index=["target_l0", "label", "family"], columns="seed",
                             values="ce", aggfunc="mean")
    wide.columns = [f"ce_seed_{int(s)}" for s in wide.columns]
    return wide.reset_index().sort_values(["target_l0", "label"], ignore_index=True)
