"""The report's sentences, each backed by an interval from comparisons.parquet.

A difference is claimed only when its 95% interval excludes 0; otherwise the sentence says
"no detectable difference" and still gives the interval. Differences are CE(penalty) -
CE(reference) at the same target L0 (negative: the penalty is better), paired by seed
(raysae.analysis.confidence).
"""

from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd

REFERENCE_LABELS = ("L1", "sqrt", "sqrt(sqrt)")


def interval_text(row) -> str:
    """'-0.062 nats [-0.081, -0.043], 3 seeds'."""
    if not math.isfinite(row["ci_low"]):
        return f"{row['delta_ce_mean']:+.3f} nats (no interval: {int(row['n_seeds'])} seed)"
    return (f"{row['delta_ce_mean']:+.3f} nats [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}], "
            f"{int(row['n_seeds'])} seed{'s' if row['n_seeds'] != 1 else ''}")


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
    if comparisons is None or not len(comparisons):
        return []
    c = comparisons
    items = []
    vs_l1 = c[(c["label"] == "sqrt") & (c["reference"] == "L1")]
    per = vs_l1[vs_l1["target_l0"].notna()].sort_values("target_l0")
    if len(per):
        parts = [f"L0 {r['target_l0']:g}: {verdict(r, 'L1')}" for _, r in per.iterrows()]
        items.append("The study's question, <b>sqrt vs L1</b> at each target: "
                     + "; ".join(parts) + ".")
    score = c[c["target_l0"].isna()]
    searched = score[~score["label"].isin((*REFERENCE_LABELS, "TopK", "BatchTopK"))
                     & (score["reference"] == "sqrt")]
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
    for baseline in ("TopK", "BatchTopK"):
        r = score[(score["label"] == best) & (score["reference"] == baseline)]
        if best is not None and len(r):
            items.append(f"<b>{html.escape(best)}</b> against <b>{baseline}</b> over the "
                         f"ladder: {verdict(r.iloc[0], baseline)}.")
    others = score[(score["reference"] == "L1") & (score["label"] != "sqrt")]
    for _, r in others.iterrows():
        items.append(f"<b>{_name(r)}</b> over the ladder: {verdict(r, 'L1')}.")
    return items


def _best_searched(score: pd.DataFrame) -> str | None:
    """The searched label with the lowest ladder-mean difference to sqrt (or to L1)."""
    searched = score[~score["label"].isin((*REFERENCE_LABELS, "TopK", "BatchTopK"))]
    for reference in ("sqrt", "L1"):
        s = searched[searched["reference"] == reference]
        if len(s):
            return str(s.loc[s["delta_ce_mean"].idxmin(), "label"])
    return None


def target_winners(comparisons: pd.DataFrame | None) -> pd.DataFrame:
    """Per target: the label with the lowest CE difference to L1 and whether it is
    significant against L1 and against sqrt (the study found the winner changes with L0)."""
    cols = ["target_l0", "label", "family", "vs_L1", "vs_sqrt", "vs_TopK", "vs_BatchTopK"]
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
        for ref in ("L1", "sqrt", "TopK", "BatchTopK"):
            r = g[(g["reference"] == ref) & (g["label"] == best["label"])]
            row[f"vs_{ref}"] = (interval_text(r.iloc[0]) + ("" if r.iloc[0]["significant"]
                                                            else " (n.s.)")) if len(r) else (
                "– (itself)" if best["label"] == ref else "–")
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def ladder_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Mean CE (over seeds) of every label at every target; L0 in brackets. No missing cell
    inside the ladder when every trial trained every target."""
    done = trials[(trials["status"] == "finished") & trials["target_l0"].notna()]
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


__all__ = ["headline", "interval_text", "ladder_table", "target_winners", "verdict", "np"]
