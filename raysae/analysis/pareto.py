"""CE-vs-L0 Pareto analysis of a penalty search: frontiers, hypervolume, matched-L0 CE.

Inputs: one results folder, read through raysae.results.contract (which names the files,
the required columns of trials.parquet and the keys of search.json). ``family`` is the
reference label (L1, sqrt, sqrt(sqrt)) or the searched family's registry name (power, tanh,
log); ``label`` names the penalty with its parameters.

Conventions. Both objectives are minimised (a metric the metrics table calls higher-is-better
enters with its sign flipped). Only "finished" trials enter frontiers; a
trained SAE's threshold sweep (by default the global threshold) joins its family's points;
points with L0 <= 0 are dropped (comparisons are in log L0). Hypervolume is measured in
(log10 L0, metric) against one reference point shared by all families (max + 10% of range).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import moocore
import numpy as np
import pandas as pd

from raysae.core.metrics import metric_names, sign
from raysae.core.penalties import PENALTIES
from raysae.results import contract
from raysae.results.vocabulary import Status

FAMILY_ORDER = ("L1", "sqrt", "sqrt(sqrt)")
"""The study's reference families come first; searched families (power, tanh, log, ...) after."""
REF_MARGIN = 0.1


@dataclass(frozen=True)
class Results:
    """Everything one results directory holds; optional tables are None when absent."""

    trials: pd.DataFrame
    ablations: pd.DataFrame | None = None
    feature_stats: pd.DataFrame | None = None
    activation_samples: pd.DataFrame | None = None
    search: dict = field(default_factory=dict)
    comparisons: pd.DataFrame | None = None


def _require(df: pd.DataFrame, columns, name: str) -> None:
    contract.require_columns(df, columns, name)


def param_columns(df: pd.DataFrame) -> list[str]:
    """The penalty's columns present: its label, every registered parameter, lambda."""
    names = {p.name for spec in PENALTIES.values() for p in spec.params}
    return [c for c in ("label", *sorted(names), "lam") if c in df.columns]


def load_results(results_dir) -> Results:
    """Read a results folder through the results contract (trials required, rest optional)."""
    root = Path(results_dir)
    return Results(contract.read_trials(root), contract.read_table(root, "ablations"),
                   contract.read_table(root, "feature_stats"),
                   contract.read_table(root, "activation_samples"),
                   contract.read_search_json(root), contract.read_comparisons(root))


def families(points: pd.DataFrame) -> list[str]:
    """Families present, the study's three first, then any others alphabetically."""
    present = set(points["family"].dropna())
    return [f for f in FAMILY_ORDER if f in present] + sorted(present - set(FAMILY_ORDER))


def points_table(trials: pd.DataFrame, ablations: pd.DataFrame | None = None,
                 method: str | None = "global_threshold") -> pd.DataFrame:
    """Finished trials plus (optionally) their threshold-sweep points, one row per point.

    Columns: trial_id, family, source ("trial" | "ablation"), parameter, l0, ce_sae and the
    metrics table's other columns present. Ablation rows with parameter 0 duplicate the
    trial and are dropped.
    """
    _require(trials, contract.REQUIRED_TRIAL_COLUMNS, "trials")
    done = trials[trials["status"] == Status.FINISHED].copy()
    done["source"], done["parameter"] = "trial", 0.0
    keep = ["trial_id", "family", "source", "parameter", "l0", "ce_sae"]
    keep += param_columns(done) + [c for c in metric_names() if c in done and c not in keep]
    parts = [done[keep]]
    if ablations is not None and method is not None and len(ablations):
        _require(ablations, contract.REQUIRED_ABLATION_COLUMNS, "ablations")
        ab = ablations[(ablations["method"] == method) & (ablations["parameter"] != 0)]
        params = param_columns(done)
        meta = done[["trial_id", "family"] + params]
        ab = ab.drop(columns=[c for c in ("family", *params) if c in ab.columns])
        ab = ab.merge(meta, on="trial_id", how="inner").assign(source="ablation")
        parts.append(ab[[c for c in keep if c in ab.columns]])
    pts = pd.concat(parts, ignore_index=True)
    ok = np.isfinite(pts["l0"]) & np.isfinite(pts["ce_sae"]) & (pts["l0"] > 0)
    return pts[ok].reset_index(drop=True)


def nondominated(x, y) -> np.ndarray:
    """Mask of points not dominated in (x, y), both minimised; duplicates kept once."""
    pts = np.column_stack([np.asarray(x, float), np.asarray(y, float)])
    if len(pts) == 0:
        return np.zeros(0, bool)
    return np.asarray(moocore.is_nondominated(pts, keep_weakly=False), bool)


def front(points: pd.DataFrame, y: str = "ce_sae", family: str | None = None) -> pd.DataFrame:
    """Non-dominated points of one family (or all when family is None), sorted by l0."""
    pts = points if family is None else points[points["family"] == family]
    pts = pts[np.isfinite(pts[y])]
    return pts[nondominated(pts["l0"], sign(y) * pts[y])].sort_values("l0").reset_index(drop=True)


def fronts(points: pd.DataFrame, y: str = "ce_sae") -> dict[str, pd.DataFrame]:
    """Each family's front plus the overall one under key "overall"."""
    out = {fam: front(points, y, fam) for fam in families(points)}
    out["overall"] = front(points, y)
    return out


def reference_point(points: pd.DataFrame, y: str = "ce_sae") -> np.ndarray:
    """Shared hypervolume reference in (log10 l0, y) (y sign-flipped when higher is better):
    max + REF_MARGIN * range per axis."""
    obj = np.column_stack([np.log10(points["l0"]), sign(y) * points[y]])
    obj = obj[np.isfinite(obj).all(axis=1)]
    if len(obj) == 0:
        raise ValueError(f"no finite (l0, {y}) points; no finished trial to analyse")
    hi, lo = obj.max(axis=0), obj.min(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return hi + REF_MARGIN * span


def hypervolume(front_points: pd.DataFrame, ref, y: str = "ce_sae") -> float:
    """Area dominated by a front in (log10 l0, y) space, bounded by ref (moocore)."""
    if len(front_points) == 0:
        return 0.0
    obj = np.column_stack([np.log10(front_points["l0"]), sign(y) * front_points[y]])
    return float(moocore.hypervolume(obj, ref=np.asarray(ref, float)))


def hypervolumes(points: pd.DataFrame, y: str = "ce_sae") -> pd.DataFrame:
    """One row per family (and "overall"): front size, hypervolume and the reference point."""
    ref = reference_point(points, y)
    rows = [{"family": fam, "n_points": int((points["family"] == fam).sum()) if fam != "overall"
             else len(points), "n_front": len(fr), "hypervolume": hypervolume(fr, ref, y),
             "ref_log10_l0": ref[0], f"ref_{y}": sign(y) * ref[1]}
            for fam, fr in fronts(points, y).items()]
    return pd.DataFrame(rows)


def interp_front(front_points: pd.DataFrame, l0, y: str = "ce_sae") -> np.ndarray:
    """A front's y at given L0s, linear in log(L0) between front points; NaN outside it."""
    l0 = np.atleast_1d(np.asarray(l0, float))
    if len(front_points) == 0:
        return np.full(l0.shape, np.nan)
    xs, ys = np.log(front_points["l0"].to_numpy(float)), front_points[y].to_numpy(float)
    out = np.interp(np.log(l0), xs, ys, left=np.nan, right=np.nan)
    return np.where((l0 > 0) & np.isfinite(l0), out, np.nan)


def matched_l0(points: pd.DataFrame, y: str = "ce_sae", baseline: str = "L1",
               n_grid: int = 80) -> pd.DataFrame:
    """Every family's front on one L0 grid, and its difference to the baseline family.

    The grid is log-spaced over all fronts plus every front's own L0s, so differences of
    the piecewise-linear (in log L0) fronts are exact between grid points. Columns: l0, one
    column per family (its y), and ``delta_<family>`` = family - baseline (negative: the
    family reaches lower y than the baseline at that L0). Outside a front's range: NaN.
    """
    frs = {k: v for k, v in fronts(points, y).items() if k != "overall"}
    knots = np.concatenate([fr["l0"].to_numpy(float) for fr in frs.values()])
    if len(knots) == 0:
        raise ValueError(f"no finished points with l0 > 0 and finite {y}")
    grid = np.unique(np.concatenate([knots, np.geomspace(knots.min(), knots.max(), n_grid)]))
    out = pd.DataFrame({"l0": grid})
    for fam, fr in frs.items():
        out[fam] = interp_front(fr, grid, y)
    if baseline in frs:
        for fam in frs:
            out[f"delta_{fam}"] = out[fam] - out[baseline]
    return out


def _log_root(l0a: float, l0b: float, da: float, db: float) -> float:
    """L0 where a difference, linear in log(L0), passes from da to db through zero."""
    t = da / (da - db)
    return float(np.exp(np.log(l0a) + t * (np.log(l0b) - np.log(l0a))))


def crossovers(curves: pd.DataFrame, family: str, baseline: str = "L1") -> pd.DataFrame:
    """L0s where ``family`` and ``baseline`` swap places, with who is better above each.

    Columns: l0, better_above (the family with lower y just above that L0).
    """
    if family not in curves or baseline not in curves:
        return pd.DataFrame({"l0": [], "better_above": []})
    d = (curves[family] - curves[baseline]).to_numpy(float)
    l0 = curves["l0"].to_numpy(float)
    ok = np.isfinite(d)
    l0, d = l0[ok], d[ok]
    rows, sgn = [], np.sign(d)
    for i in range(len(d) - 1):
        if sgn[i] != sgn[i + 1] and sgn[i + 1] != 0:
            at = l0[i] if sgn[i] == 0 else _log_root(l0[i], l0[i + 1], d[i], d[i + 1])
            rows.append({"l0": at, "better_above": family if sgn[i + 1] < 0 else baseline})
    return pd.DataFrame(rows, columns=["l0", "better_above"])


def switch_point(curves: pd.DataFrame, family: str, baseline: str = "L1") -> dict:
    """Where ``family`` beats ``baseline``, as one number: the study's "better above L0 ~ 15".

    side is "above" (family better at every grid L0 above ``l0``: its last crossover),
    "below" (better at every L0 below its first crossover), "everywhere", "nowhere" or
    "middle" (better only inside the range; l0 NaN). Also: the shared L0 range, the number
    of crossovers, the largest gain (baseline - family) and the L0 where it occurs.
    """
    out = {"family": family, "baseline": baseline, "side": "nowhere", "l0": np.nan,
           "l0_min": np.nan, "l0_max": np.nan, "n_crossings": 0, "max_gain": np.nan,
           "max_gain_l0": np.nan}
    if family not in curves or baseline not in curves:
        return out
    d = (curves[family] - curves[baseline]).to_numpy(float)
    ok = np.isfinite(d)
    if not ok.any():
        return out
    l0, d = curves["l0"].to_numpy(float)[ok], d[ok]
    cross = crossovers(curves, family, baseline)
    k = int(np.argmin(d))
    out.update(l0_min=l0[0], l0_max=l0[-1], n_crossings=len(cross), max_gain=-d[k],
               max_gain_l0=l0[k])
    better = d < 0
    if better.all() or not better.any():
        out["side"] = "everywhere" if better.all() else "nowhere"
    elif better[-1] or better[0]:
        j = np.flatnonzero(~better)[-1 if better[-1] else 0]  # last / first non-winning L0
        i = j + 1 if better[-1] else j - 1  # its winning neighbour
        at = l0[j] if d[j] == 0 else _log_root(l0[j], l0[i], d[j], d[i])
        out.update(side="above" if better[-1] else "below", l0=float(at))
    else:
        out["side"] = "middle"
    return out


def win_ranges(curves: pd.DataFrame, fams: list[str] | None = None,
               tol: float = 0.0) -> pd.DataFrame:
    """Contiguous L0 ranges over which each family's front is lowest among those defined.

    With tol > 0 the lead changes only when a challenger is lower by more than tol (so noise
    between near-equal fronts does not split ranges). Columns: family, l0_from, l0_to,
    max_margin (the leader's largest lead over the runner-up in the range; NaN where it is
    alone). Where two ranges meet, the boundary is interpolated in log(L0) to the point
    where the challenger's lead reaches tol (with tol = 0: the exact crossover).
    """
    fams = fams or [c for c in curves.columns if c != "l0" and not c.startswith("delta_")]
    vals, l0 = curves[fams].to_numpy(float), curves["l0"].to_numpy(float)
    filled = np.where(np.isfinite(vals), vals, np.inf)
    lead = np.full(len(l0), -1)
    for i in np.flatnonzero(np.isfinite(vals).any(axis=1)):
        c, b = lead[i - 1] if i else -1, int(np.argmin(filled[i]))
        keep = c >= 0 and np.isfinite(vals[i, c]) and filled[i, b] >= vals[i, c] - tol
        lead[i] = c if keep else b
    idx = np.flatnonzero(lead >= 0)
    runs = np.split(idx, np.flatnonzero((np.diff(idx) != 1) | (np.diff(lead[idx]) != 0)) + 1)
    rows = []
    for seg in (r for r in runs if len(r)):
        f = lead[seg[0]]
        gap = np.delete(filled[seg], f, axis=1).min(axis=1, initial=np.inf) - vals[seg, f]
        gap = gap[np.isfinite(gap)]
        rows.append({"family": fams[f], "l0_from": l0[seg[0]], "l0_to": l0[seg[-1]],
                     "max_margin": float(gap.max()) if len(gap) else np.nan,
                     "_first": seg[0], "_last": seg[-1]})
    for a, b in pairwise(rows):
        i, fa, fb = b["_first"], lead[a["_last"]], lead[b["_first"]]
        if a["_last"] == i - 1:
            da, db = (vals[j, fa] - vals[j, fb] - tol for j in (i - 1, i))
            if np.isfinite(da) and np.isfinite(db) and da != db and da <= 0 < db:
                a["l0_to"] = b["l0_from"] = _log_root(l0[i - 1], l0[i], da, db)
    return pd.DataFrame(rows, columns=["family", "l0_from", "l0_to", "max_margin"])


def default_targets(trials: pd.DataFrame, points: pd.DataFrame, n: int = 5) -> list[float]:
    """The search's target L0s, or else n round log-spaced L0s across the trained SAEs' L0s
    (not the threshold sweeps', which reach L0s no SAE was trained for)."""
    if "target_l0" in trials:
        t = pd.to_numeric(trials["target_l0"], errors="coerce").dropna().unique()
        if len(t):
            return sorted(float(v) for v in t)
    trained = trials.loc[trials["status"] == Status.FINISHED, "l0"] if "status" in trials else []
    l0 = pd.to_numeric(pd.Series(trained), errors="coerce")
    l0 = l0[l0 > 0]
    if len(l0) == 0:
        fr = front(points)
        if len(fr) == 0:
            return []
        l0 = fr["l0"]
    grid = np.geomspace(l0.min(), l0.max(), n + 2)[1:-1]
    return sorted({float(f"{v:.2g}") for v in grid})


def summary_table(trials: pd.DataFrame, points: pd.DataFrame, targets, tol: float = 0.25,
                  y: str = "ce_sae", compare=("L1", "sqrt")) -> pd.DataFrame:
    """The best finished trial near each target L0 and the y it saves over baseline fronts.

    A trial is near target T when its measured L0 is within a factor (1 + tol) of T; the best
    has the lowest y. Savings compare at the best trial's *measured* L0 (same L0, fair):
    ``saved_vs_<fam>`` = front_<fam>(l0) - y_best, positive when the best is better; NaN
    where that family's front does not reach that L0. One row per target, even with no match.
    """
    done = trials[(trials["status"] == Status.FINISHED) & (trials["l0"] > 0)]
    frs = {fam: front(points, y, fam) for fam in compare}
    rows = []
    for t in targets:
        near = done[np.abs(np.log(done["l0"] / t)) <= np.log1p(tol)]
        row = {"target_l0": float(t), "n_near": len(near)}
        if len(near):
            b = near.loc[near[y].idxmin()]
            keys = ("trial_id", "family", *param_columns(trials))
            row.update({k: b.get(k, np.nan) for k in keys})
            row.update(l0=float(b["l0"]), **{y: float(b[y])})
            for fam, fr in frs.items():
                row[f"{y}_{fam}"] = float(interp_front(fr, b["l0"], y)[0])
                row[f"saved_vs_{fam}"] = row[f"{y}_{fam}"] - row[y]
        rows.append(row)
    cols = ["target_l0", "n_near", "trial_id", "family", *param_columns(trials), "l0", y]
    cols += [f"{k}_{fam}" for fam in compare for k in (y, "saved_vs")]
    return pd.DataFrame(rows).reindex(columns=cols)
