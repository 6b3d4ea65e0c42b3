"""Figures for the report, drawn from tables that raysae.analysis.pareto already computed.

Every function takes DataFrames / dicts, writes one PNG (temp file, then rename) and
returns its path. Nothing here decides what is on a front or who wins; that is pareto's.
Line styles follow the study: L1 solid, sqrt dotted, sqrt(sqrt) dash-dot. Metric labels and
which way is better come from the metrics table (raysae.core.metrics).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

from raysae.analysis.claims import claim_rows

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter, NullFormatter

from raysae import io
from raysae.core.kinds import kind_styles
from raysae.core.metrics import frontier_metrics, reconstruction_names, sign
from raysae.core.metrics import label as metric_label
from raysae.results.vocabulary import Status

STYLE = {
    "L1": {"color": "#1f5fa8", "ls": "-", "marker": "o"},
    "sqrt": {"color": "#d9731a", "ls": ":", "marker": "s"},
    "sqrt(sqrt)": {"color": "#2e8b57", "ls": "-.", "marker": "^"},
    "power": {"color": "#7b3fa0", "ls": "--", "marker": "D"},
    "tanh": {"color": "#b8860b", "ls": "--", "marker": "P"},
    "log": {"color": "#c71585", "ls": "--", "marker": "X"},
}
"""Penalty families' styles; SAE kinds carry their own (SAEKind.style)."""
OTHER = {"color": "#666666", "ls": (0, (5, 2, 1, 2)), "marker": "v"}
plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3,
                     "axes.spines.top": False, "axes.spines.right": False, "font.size": 10})


def style(family: str) -> dict:
    """Colour, line style and marker of a family (grey dash-dot-dot for unknown ones)."""
    return STYLE.get(family) or kind_styles().get(family, OTHER)


def save_png(fig, path, dpi: int | None = None) -> Path:
    """Write ``fig`` as a PNG atomically (raysae.io) and close it."""
    try:
        return io.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi,
                                                           bbox_inches="tight"))
    finally:
        plt.close(fig)


def _log_l0_axis(ax, label: str = "L0 (active features per token)") -> None:
    """Log x axis with plain numbers; minor ticks labelled only when under ~1.5 decades."""
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    lo, hi = ax.get_xlim()
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain if hi / lo < 30 else NullFormatter())
    ax.set_xlabel(label)


def frontier(points: pd.DataFrame, fronts: dict, path, y: str = "ce_sae",
             best: pd.DataFrame | None = None, ce_clean: float | None = None) -> Path:
    """y vs L0: every point faint, each family's front as a line, the overall front thick."""
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    overall = fronts.get("overall")
    if overall is not None and len(overall):
        ax.plot(overall["l0"], overall[y], color="#bbbbbb", lw=7, alpha=0.55, zorder=1,
                solid_capstyle="round", label="Pareto front, all trials")
    for fam, fr in fronts.items():
        if fam == "overall":
            continue
        st, pts = style(fam), points[points["family"] == fam]
        for src, size, alpha in (("ablation", 9, 0.25), ("trial", 26, 0.55)):
            sub = pts[pts["source"] == src]
            ax.scatter(sub["l0"], sub[y], s=size, color=st["color"], marker=st["marker"],
                       alpha=alpha, lw=0, zorder=2)
        ax.plot(fr["l0"], fr[y], color=st["color"], ls=st["ls"], lw=2.2, zorder=3,
                label=f"{fam} front ({int((pts['source'] == 'trial').sum())} SAEs)")
    if best is not None and len(best.dropna(subset=["l0"])):
        b = best.dropna(subset=["l0"])
        ax.scatter(b["l0"], b[y], marker="*", s=220, color="#c0392b", edgecolor="k", lw=0.6,
                   zorder=5, label="best found per target L0")
        for _, r in b.iterrows():
            ax.annotate(str(r.get("label", r["family"])), (r["l0"], r[y]), fontsize=8,
                        xytext=(7, 7), textcoords="offset points", color="#7b1d12", zorder=6,
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none",
                              "alpha": 0.8})
    if ce_clean is not None and np.isfinite(ce_clean):
        ax.axhline(ce_clean, color="k", lw=1, ls=(0, (2, 2)),
                   label=f"clean model CE {ce_clean:.3g}")
    _log_l0_axis(ax)
    ax.set_ylabel(metric_label(y))
    corner = "lower" if sign(y) > 0 else "upper"
    ax.set_title(f"{metric_label(y)} vs L0 ({corner}-left is better)", loc="left")
    ax.legend(fontsize=8.5, frameon=False)
    return save_png(fig, path)


def delta_to_baseline(curves: pd.DataFrame, switches: pd.DataFrame, path,
                      baseline: str = "L1") -> Path:
    """Each family's front minus the baseline's at matched L0; below zero beats the baseline.

    switches: rows of pareto.switch_point (family, side, l0); each finite l0 is marked.
    """
    fig, ax = plt.subplots(figsize=(8.5, 4))
    ax.axhline(0, color=style(baseline)["color"], lw=1.8, label=f"{baseline} (reference)")
    for col in [c for c in curves.columns if c.startswith("delta_")]:
        fam = col[len("delta_"):]
        if fam != baseline:
            st = style(fam)
            ax.plot(curves["l0"], curves[col], color=st["color"], ls=st["ls"], lw=2, label=fam)
    for k, r in enumerate(switches.dropna(subset=["l0"]).itertuples()):
        st = style(r.family)
        ax.axvline(r.l0, color=st["color"], lw=1, ls=(0, (4, 3)))
        ax.annotate(f"{r.family} better {r.side} L0 {r.l0:.3g}", (r.l0, 0.03 + 0.09 * k),
                    xycoords=("data", "axes fraction"), xytext=(4, 0),
                    textcoords="offset points", fontsize=8.5, color=st["color"],
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none",
                          "alpha": 0.85})
    _log_l0_axis(ax)
    ax.set_ylabel(f"CE minus {baseline}'s CE (nats)")
    ax.set_title(f"CE difference to {baseline} at matched L0 (below 0: better than {baseline})",
                 loc="left")
    ax.legend(fontsize=8.5, frameon=False)
    return save_png(fig, path)


def panel_metrics() -> list[str]:
    """The metrics table's reconstruction metrics without a frontier figure of their own
    (L0 is the x axis)."""
    frontier = set(frontier_metrics())
    return [m for m in reconstruction_names() if m != "l0" and m not in frontier]


def metrics_vs_l0(points: pd.DataFrame, path, metrics=None) -> Path:
    """Reconstruction metrics of the trained SAEs against their L0, one panel per metric
    (default: ``panel_metrics()``)."""
    metrics = [m for m in metrics or panel_metrics() if m in points.columns]
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(4.2 * max(len(metrics), 1), 3.6))
    trained = points[points["source"] == "trial"]
    for ax, m in zip(np.atleast_1d(axes), metrics, strict=False):
        for fam in dict.fromkeys(trained["family"]):
            sub, st = trained[trained["family"] == fam].sort_values("l0"), style(fam)
            ax.plot(sub["l0"], sub[m], color=st["color"], ls=st["ls"], marker=st["marker"],
                    ms=4, lw=1.2, alpha=0.85, label=fam)
        _log_l0_axis(ax, "L0")
        ax.set_title(metric_label(m), loc="left", fontsize=10)
    np.atleast_1d(axes)[0].legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return save_png(fig, path)


def feature_frequency(stats: pd.DataFrame, reps: dict, path, floor: float = 1e-8) -> Path:
    """log10 feature-frequency histograms, one SAE per family (reps: family -> (trial_id, l0))."""
    fig, ax = plt.subplots(figsize=(8.5, 3.8))
    mine = stats["trial_id"].isin([tid for tid, _ in reps.values()]) & (stats["frequency"] > 0)
    pos = stats.loc[mine, "frequency"].to_numpy(float)
    lo = min(-5.5, np.floor(np.log10(max(pos.min(), floor)))) if len(pos) else np.log10(floor)
    bins = np.linspace(lo, 0, 46)
    for fam, (tid, l0) in reps.items():
        freq = stats.loc[stats["trial_id"] == tid, "frequency"].to_numpy(float)
        dead, st = int((freq <= 0).sum()), style(fam)
        ax.hist(np.log10(np.clip(freq[freq > 0], floor, 1)), bins=bins, histtype="step", lw=2,
                color=st["color"], ls=st["ls"], label=f"{fam} (L0 {l0:.3g}; {dead} dead)")
    ax.axvline(-5, color="k", lw=0.8, ls="--")
    ax.annotate("low-frequency threshold 1e-5", (-5, 1), xycoords=("data", "axes fraction"),
                va="top", ha="right", rotation=90, fontsize=8)
    ax.set_xlabel("log10 feature frequency (fraction of tokens where it fires)")
    ax.set_ylabel("features")
    ax.set_title("Feature frequency per family (one SAE each, at similar L0)", loc="left")
    ax.legend(fontsize=8.5, frameon=False)
    return save_png(fig, path)


def activation_hist(samples: pd.DataFrame, reps: dict, medians: dict, path) -> Path:
    """Nonzero feature activations per family, median marked (study: L1 0.28, sqrt 0.43)."""
    fig, ax = plt.subplots(figsize=(8.5, 3.8))
    vals = samples.loc[samples["activation"] > 0, "activation"].to_numpy(float)
    hi = float(np.quantile(vals, 0.995)) if len(vals) else 1.0
    bins = np.linspace(0, hi, 60)
    for fam, (tid, l0) in reps.items():
        a, st = samples.loc[samples["trial_id"] == tid, "activation"].to_numpy(float), style(fam)
        ax.hist(a, bins=bins, histtype="step", lw=2, color=st["color"], ls=st["ls"], density=True,
                label=f"{fam} (L0 {l0:.3g}): median {medians[fam]:.3g}")
        ax.axvline(medians[fam], color=st["color"], ls=st["ls"], lw=1.3)
    ax.set_xlabel("nonzero feature activation")
    ax.set_ylabel("density")
    ax.set_title("Feature activations of the first tokens (vertical lines: medians)", loc="left")
    ax.legend(fontsize=8.5, frameon=False)
    return save_png(fig, path)


def optuna_history(trials: pd.DataFrame, path, direction: str = "minimize") -> Path:
    """Objective per trial in table order, coloured by family, with the running best."""
    fig, ax = plt.subplots(figsize=(8.5, 3.6))
    t = trials.reset_index(drop=True)
    ok = (t["status"] == Status.FINISHED) & np.isfinite(t["objective"])
    for fam in dict.fromkeys(t.loc[ok, "family"]):
        sub = t[ok & (t["family"] == fam)]
        ax.scatter(sub.index, sub["objective"], s=18, color=style(fam)["color"],
                   marker=style(fam)["marker"], label=fam)
    for k, i in enumerate(t.index[~ok]):
        ax.axvline(i, color="#c0392b", alpha=0.3, lw=1,
                   label=f"not finished ({int((~ok).sum())})" if k == 0 else None)
    run = t["objective"].where(ok)
    run = run.cummin() if direction == "minimize" else run.cummax()
    ax.step(t.index, run, where="post", color="k", lw=1.4, label="best so far")
    ax.set_xlabel("trial (table order)")
    ax.set_ylabel("objective")
    ax.set_title("Search history", loc="left")
    ax.legend(fontsize=8, frameon=False, ncol=3)
    return save_png(fig, path)


def importance(importances: dict, path) -> Path:
    """Horizontal bars of Optuna's parameter importances."""
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.5 * len(importances)))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color="#7b3fa0")
    ax.set_xlabel("importance (Optuna, sums to 1)")
    ax.set_title("Which search parameter matters for the objective", loc="left")
    return save_png(fig, path)


def ablation_curves(ablations: pd.DataFrame, family_of: dict, path,
                    method: str = "global_threshold", y: str = "ce_sae") -> Path:
    """Every SAE's threshold-removal curve (the study's 15-SAE figure); dot = unablated."""
    fig, ax = plt.subplots(figsize=(8.5, 5))
    ab = ablations[(ablations["method"] == method) & (ablations["l0"] > 0)]
    seen = set()
    for tid, sub in ab.groupby("trial_id", sort=False):
        fam = family_of.get(tid, "?")
        st, sub = style(fam), sub.sort_values("parameter")
        ax.plot(sub["l0"], sub[y], color=st["color"], ls=st["ls"], lw=1.3, alpha=0.8,
                label=None if fam in seen else fam)
        seen.add(fam)
        orig = sub[sub["parameter"] == 0]
        ax.scatter(orig["l0"], orig[y], color=st["color"], marker=st["marker"], s=30, zorder=3)
    _log_l0_axis(ax)
    ax.set_ylabel(metric_label(y))
    ax.set_title(f"Removing the lowest activations ({method}) from every SAE", loc="left")
    ax.legend(fontsize=8.5, frameon=False)
    return save_png(fig, path)


def ablation_methods(ablations: pd.DataFrame, trial_id: str, path) -> Path:
    """The four removal methods on one SAE: CE and MSE vs L0 (the study's 'messy graph')."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ab = ablations[(ablations["trial_id"] == trial_id) & (ablations["l0"] > 0)]
    for i, (method, sub) in enumerate(ab.groupby("method", sort=True)):
        sub = sub.sort_values("parameter")
        for ax, m in zip(axes, ("ce_sae", "mse"), strict=True):
            ax.plot(sub["l0"], sub[m], marker="o", ms=3, lw=1.5, color=f"C{i}", label=method)
    for ax, m in zip(axes, ("ce_sae", "mse"), strict=True):
        _log_l0_axis(ax)
        ax.set_title(metric_label(m), loc="left", fontsize=10)
    axes[0].legend(fontsize=8, frameon=False)
    fig.suptitle(f"Four ways to remove low activations, SAE {trial_id}", x=0.01, ha="left")
    fig.tight_layout()
    return save_png(fig, path)


def delta_bands(comparisons: pd.DataFrame, path, reference: str = "L1") -> Path:
    """Each label's paired CE difference to the reference per target L0, with its 95%
    interval as a band (below 0: better than the reference)."""
    comparisons = claim_rows(comparisons)
    c = comparisons[(comparisons["reference"] == reference) & comparisons["target_l0"].notna()]
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    ax.axhline(0, color=style(reference)["color"], lw=1.8, label=f"{reference} (reference)")
    for label, g in c.sort_values("target_l0").groupby("label", sort=False):
        st = style(str(g["family"].iloc[0]) if label not in STYLE else label)
        ax.plot(g["target_l0"], g["delta_ce_mean"], color=st["color"], ls=st["ls"],
                marker=st["marker"], lw=1.8, label=f"{label} (n={int(g['n_seeds'].max())})")
        ok = np.isfinite(g["ci_low"])
        ax.fill_between(g["target_l0"][ok], g["ci_low"][ok], g["ci_high"][ok],
                        color=st["color"], alpha=0.15, lw=0)
    _log_l0_axis(ax, "target L0")
    ax.set_ylabel(f"CE minus {reference}'s CE (nats)")
    ax.set_title(f"Paired CE difference to {reference} per target, 95% intervals", loc="left")
    ax.legend(fontsize=8, frameon=False, ncol=2)
    return save_png(fig, path)
