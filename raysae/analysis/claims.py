"""The report's sentences, each backed by an interval from comparisons.parquet.

A difference is claimed only when it is called under false-discovery-rate control across
the run's comparisons (Benjamini-Hochberg at 5%; raysae.analysis.multiplicity), and the
interval given is the false-coverage-rate adjusted one, wider than 95%, that agrees with the
call; otherwise the sentence says "no detectable difference" and still gives the interval.
Differences are CE(penalty) - CE(reference) at the reference's achieved L0 (basis
``matched_l0``; ``target`` for results written before it existed; negative: the penalty is
better), paired by seed, searched proposals on the seeds that did not choose them
(raysae.analysis.confidence).
"""

from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd

from raysae.analysis.confidence import REFERENCES
from raysae.core.kinds import KINDS, baseline_labels, default_baselines
from raysae.core.penalties import reference_points
from raysae.results.vocabulary import Status

REFERENCE_LABELS = tuple(label for label, _name, _params in reference_points())
"""The penalty registry's reference labels (the study's L1, sqrt, sqrt(sqrt))."""


def fixed_labels() -> tuple[str, ...]:
    """Labels that are references, never searched proposals: the reference penalties and
    the registered baseline kinds (read at call time: plugins may add kinds)."""
    return (*REFERENCE_LABELS, *baseline_labels())


def comparison_references() -> tuple[str, ...]:
    """What every label is compared against: L1, sqrt and the baseline kinds."""
    return (*REFERENCES, *baseline_labels())


CLAIM_BASIS = "matched_l0"


def claim_rows(comparisons: pd.DataFrame | None, budget: float = 1.0) -> pd.DataFrame | None:
    """The comparisons the claims rest on: basis ``matched_l0`` where present, at the
    search's own training budget (``budget`` 1; a budget check's rows have its factor)."""
    if comparisons is None:
        return None
    if "budget" in comparisons:
        comparisons = comparisons[comparisons["budget"].fillna(1.0) == budget]
    if "basis" not in comparisons:
        return comparisons
    matched = comparisons[comparisons["basis"] == CLAIM_BASIS]
    return matched if len(matched) else comparisons[comparisons["basis"] == "target"]


def budget_table(comparisons: pd.DataFrame | None) -> pd.DataFrame:
    """Each comparison of the budget check's SAEs at 1x tokens beside the same one at k x:
    does the claim keep its sign, and its significance?"""
    cols = ["label", "reference", "target_l0", "budget", "at 1x", "at k x", "same sign",
            "significance kept"]
    if comparisons is None or "budget" not in comparisons:
        return pd.DataFrame(columns=cols)
    keys = ["label", "family", "reference", "target_l0"]
    base = claim_rows(comparisons, 1.0)
    rows = []
    for k in sorted(set(comparisons["budget"].dropna()) - {1.0}):
        longer = claim_rows(comparisons, k)
        both = base.merge(longer, on=keys, suffixes=("_1", "_k"))
        for _, r in both.iterrows():
            one = {c[:-2]: r[c] for c in r.index if c.endswith("_1")}
            more = {c[:-2]: r[c] for c in r.index if c.endswith("_k")}
            rows.append({"label": r["label"], "reference": r["reference"],
                         "target_l0": r["target_l0"], "budget": f"{k:g}x",
                         "at 1x": interval_text(one), "at k x": interval_text(more),
                         "same sign": bool(np.sign(one["delta_ce_mean"])
                                           == np.sign(more["delta_ce_mean"])),
                         "significance kept": bool(one["significant"]) == bool(
                             more["significant"])})
    out = pd.DataFrame(rows, columns=cols)
    return out.sort_values(["reference", "label", "target_l0"], na_position="last",
                           ignore_index=True) if len(out) else out


def interval_text(row) -> str:
    """'-0.062 nats [-0.081, -0.043] (99.2% FCR-adjusted), 3 seeds'."""
    biased = "" if bool(row.get("fresh_seeds_only", True)) else (
        "; on the replicate that chose it, biased in its favour")
    if not math.isfinite(row["ci_low"]):
        return (f"{row['delta_ce_mean']:+.3f} nats (no interval: {int(row['n_seeds'])} seed"
                f"{biased})")
    level = float(row.get("ci_level", math.nan))
    adjusted = f" ({level:.1%} FCR-adjusted)" if math.isfinite(level) and level > 0.95 else ""
    return (f"{row['delta_ce_mean']:+.3f} nats [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"
            f"{adjusted}, {int(row['n_seeds'])} seed{'s' if row['n_seeds'] != 1 else ''}"
            f"{biased}")


def verdict(row, reference: str) -> str:
    """'<b>beats L1</b> by ...' / 'is worse than L1 by ...' / 'no detectable difference ...'."""
    if not bool(row["significant"]):
        return f"no detectable difference to {reference} ({interval_text(row)})"
    if row["delta_ce_mean"] < 0:
        return f"<b>beats {reference}</b> by {interval_text(row)}"
    return f"is worse than {reference} by {interval_text(row)}"


def _name(row) -> str:
    return html.escape(str(row["label"]))


def headline(comparisons: pd.DataFrame | None) -> list[str]:
    """Sentences: sqrt vs L1 per target and over the ladder; the best searched penalty
    whose advantage over sqrt is significant, or that none is."""
    c = claim_rows(comparisons)
    if c is None or not len(c):
        return []
    items = []
    reach = baseline_reach(comparisons)
    if reach:
        items.append(f"Does any penalty reach <b>{first_baseline()}</b>? "
                     + "; ".join(reach) + ".")
    vs_l1 = c[(c["label"] == "sqrt") & (c["reference"] == "L1")]
    per = vs_l1[vs_l1["target_l0"].notna()].sort_values("target_l0")
    if len(per):
        parts = [f"L0 {r['target_l0']:g}: {verdict(r, 'L1')}" for _, r in per.iterrows()]
        items.append("The study's question, <b>sqrt vs L1</b> at each target: "
                     + "; ".join(parts) + ".")
    score = c[c["target_l0"].isna()]
    searched = _confirmed(score[~score["label"].isin(fixed_labels())
                                & (score["reference"] == "sqrt")])
    if len(searched):
        wins = searched[searched["significant"] & (searched["delta_ce_mean"] < 0)]
        if len(wins):
            r = wins.loc[wins["delta_ce_mean"].idxmin()]
            items.append(f"Best penalty found: <b>{_name(r)}</b> ({html.escape(r['family'])}) "
                         f"{verdict(r, 'sqrt')} averaged over the ladder.")
        else:
            r = searched.loc[searched["delta_ce_mean"].idxmin()]
            items.append("No searched penalty beats sqrt detectably over the ladder; the "
                         f"closest, <b>{_name(r)}</b>: {verdict(r, 'sqrt')}.")
    best = _best_searched(score)
    for baseline in baseline_labels():
        r = score[(score["label"] == best) & (score["reference"] == baseline)]
        if best is not None and len(r):
            items.append(f"<b>{html.escape(best)}</b> against <b>{baseline}</b> over the "
                         f"ladder: {verdict(r.iloc[0], baseline)}.")
    others = score[(score["reference"] == "L1") & (score["label"] != "sqrt")]
    for _, r in others.iterrows():
        items.append(f"<b>{_name(r)}</b> over the ladder: {verdict(r, 'L1')}.")
    return items


def _confirmed(rows: pd.DataFrame) -> pd.DataFrame:
    """Proposals judged on fresh seeds, when any is (the others were judged on the replicate
    that chose them)."""
    if "fresh_seeds_only" not in rows or not rows["fresh_seeds_only"].any():
        return rows
    return rows[rows["fresh_seeds_only"].astype(bool)]


def _best_searched(score: pd.DataFrame) -> str | None:
    """The searched label with the lowest ladder-mean difference to sqrt (or to L1)."""
    searched = _confirmed(score[~score["label"].isin(fixed_labels())])
    for reference in ("sqrt", "L1"):
        s = searched[searched["reference"] == reference]
        if len(s):
            return str(s.loc[s["delta_ce_mean"].idxmin(), "label"])
    return None


def target_winners(comparisons: pd.DataFrame | None) -> pd.DataFrame:
    """Per target: the label with the lowest CE difference to L1 and whether it is
    significant against L1 and against sqrt (the study found the winner changes with L0)."""
    refs = comparison_references()
    cols = ["target_l0", "label", "family", *(f"vs_{ref}" for ref in refs)]
    comparisons = claim_rows(comparisons)
    if comparisons is None or not len(comparisons):
        return pd.DataFrame(columns=cols)
    c = comparisons[comparisons["target_l0"].notna()]
    rows = []
    for t, g in c.groupby("target_l0"):
        l1 = g[g["reference"] == "L1"]
        if not len(l1):
            continue
        best = l1.loc[l1["delta_ce_mean"].idxmin()]
        row = {"target_l0": t, "label": best["label"], "family": best["family"]}
        for ref in refs:
            r = g[(g["reference"] == ref) & (g["label"] == best["label"])]
            row[f"vs_{ref}"] = (interval_text(r.iloc[0]) + ("" if r.iloc[0]["significant"]
                                                            else " (n.s.)")) if len(r) else (
                "– (itself)" if best["label"] == ref else "–")
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def ladder_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Mean CE (over seeds) of every label at every target; L0 in brackets. No missing cell
    inside the ladder when every trial trained every target."""
    done = trials[(trials["status"] == Status.FINISHED) & trials["target_l0"].notna()]
    if not len(done):
        return pd.DataFrame()
    g = done.groupby(["label", "target_l0"])
    cell = g["ce_sae"].mean().map("{:.4f}".format) + " (L0 " + g["l0"].mean().map(
        "{:.3g}".format) + ", n=" + g["ce_sae"].size().astype(str) + ")"
    table = cell.unstack("target_l0")
    table.columns = [f"L0 {t:g}" for t in table.columns]
    order = [x for x in REFERENCE_LABELS if x in table.index]
    order += sorted(set(table.index) - set(order))
    return table.loc[order].reset_index()


__all__ = ["budget_table", "claim_rows", "comparison_references", "fixed_labels", "headline",
           "interval_text", "ladder_table", "target_winners", "verdict", "np"]


def reference_matrix(comparisons: pd.DataFrame | None, reference: str) -> pd.DataFrame:
    """Every label against ``reference`` on the claims' basis: one row per label, one
    column per target L0 and ``ladder`` (the mean over the ladder). Each cell is
    ``(difference, call)``: call -1 the label is better (called), +1 worse (called), 0 no
    detectable difference, None no comparison."""
    c = claim_rows(comparisons)
    if c is None or not len(c):
        return pd.DataFrame()
    c = c[c["reference"] == reference]
    if not len(c):
        return pd.DataFrame()
    targets = sorted(c["target_l0"].dropna().unique())
    columns = [*targets, "ladder"]
    labels = sorted(c["label"].unique(), key=lambda x: (x not in fixed_labels(), x))
    out = pd.DataFrame(index=labels, columns=columns, dtype=object)
    for _, r in c.iterrows():
        col = "ladder" if pd.isna(r["target_l0"]) else r["target_l0"]
        call = (-1 if r["delta_ce_mean"] < 0 else 1) if bool(r["significant"]) else 0
        out.at[r["label"], col] = (float(r["delta_ce_mean"]), call)
    return out


def _listed(rows: pd.DataFrame) -> str:
    return "; ".join(f"{_name(r)} {interval_text(r)}"
                     for _, r in rows.sort_values("delta_ce_mean").iterrows())


def first_baseline() -> str | None:
    """The label of the first baseline kind of the default search (TopK today): the one
    the plain answer measures every penalty against."""
    labels = [KINDS[name].label for name in default_baselines()]
    return labels[0] if labels else None


def baseline_reach(comparisons: pd.DataFrame | None, baseline: str | None = None
                   ) -> list[str]:
    """Per target L0: does any penalty reach ``baseline`` (default: ``first_baseline``)?
    The penalties called better than it, or that none is and the closest one. The answer
    may be that none does."""
    baseline = baseline or first_baseline()
    c = claim_rows(comparisons)
    if c is None or not len(c):
        return []
    c = c[(c["reference"] == baseline) & c["target_l0"].notna()
          & ~c["label"].isin(baseline_labels())]
    items = []
    for target, g in c.groupby("target_l0"):
        g = _confirmed(g)  # a proposal judged on the seed that chose it is not an answer
        better = g[g["significant"].astype(bool) & (g["delta_ce_mean"] < 0)]
        if len(better):
            text = f"better than {baseline}: {_listed(better)}"
        else:
            closest = g.loc[[g["delta_ce_mean"].idxmin()]]
            text = (f"no penalty is detectably better than {baseline}; the closest: "
                    f"{_listed(closest)}")
        items.append(f"<b>L0 {target:g}</b>: {text}")
    return items
