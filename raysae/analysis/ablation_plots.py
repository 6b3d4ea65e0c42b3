"""The study's two ablation figures, drawn from an ablation table (``raysae.evaluation.ablation``).

- ``removal_strength``: per method, MSE (red, left axis) and CE (blue, right axis) as more
  activations are removed. x is L0, so the unablated SAE sits bottom-right and "everything
  removed" top-left, as in the study; each CE point is labelled with its parameter.
- ``methods_ce_vs_l0``: the four methods' CE-vs-L0 curves on one log-L0 figure.

Each function writes one PNG (temp file, then rename) and returns its path; no computation.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from raysae.analysis.plots import save_png

MSE_COLOR, CE_COLOR = "#c0392b", "#1f5fa8"
METHOD_COLOR = {"lowest_k": "#2e8b57", "percent_of_max": "#d9731a", "quantile": "#7b3fa0",
                "global_threshold": "#1f5fa8"}
METHOD_LABEL = {"lowest_k": "lowest k per token", "percent_of_max": "% of feature max",
                "quantile": "feature quantile", "global_threshold": "global threshold"}
REQUIRED = ("method", "parameter", "l0", "mse", "ce_sae")


def _check(table: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED if c not in table.columns]
    if missing or not len(table):
        raise ValueError(f"ablation table is empty or lacks columns {missing}; pass the "
                         f"DataFrame from raysae.evaluation.ablation.ablation_sweep")


def _param_label(method: str, value: float) -> str:
    if method == "lowest_k":
        return f"k={value:g}"
    if method in ("percent_of_max", "quantile"):
        return f"{100 * value:.0f}%"
    return f"{value:.2g}"


def _ce_clean(table: pd.DataFrame, ce_clean: float | None) -> float | None:
    return ce_clean if ce_clean is not None else table.attrs.get("ce_clean")


def removal_strength(table: pd.DataFrame, path, ce_clean: float | None = None,
                     title: str | None = None) -> Path:
    """One panel per method: MSE (left, red) and CE (right, blue) against L0."""
    _check(table)
    methods = list(dict.fromkeys(table["method"]))
    cols = min(2, len(methods))
    rows = int(np.ceil(len(methods) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.2 * rows), squeeze=False)
    clean = _ce_clean(table, ce_clean)
    for ax, method in zip(axes.flat, methods, strict=False):
        sub = table[table["method"] == method].sort_values("parameter")
        ax.plot(sub["l0"], sub["mse"], "o-", color=MSE_COLOR, ms=3.5, lw=1.6)
        ax.set_ylabel("MSE", color=MSE_COLOR)
        ax.tick_params(axis="y", colors=MSE_COLOR)
        ax.set_xlabel("L0 (active features per token)  <- more removed")
        ax.grid(alpha=0.3)
        ce = ax.twinx()
        ce.plot(sub["l0"], sub["ce_sae"], "s--", color=CE_COLOR, ms=3.5, lw=1.6)
        if clean is not None:
            ce.axhline(clean, color=CE_COLOR, lw=0.8, ls=":", alpha=0.8)
        for x, y, p in zip(sub["l0"], sub["ce_sae"], sub["parameter"], strict=True):
            ce.annotate(_param_label(method, p), (x, y), textcoords="offset points",
                        xytext=(3, 4), fontsize=6.5, color=CE_COLOR)
        ce.set_ylabel("CE with SAE spliced in (nats)", color=CE_COLOR)
        ce.tick_params(axis="y", colors=CE_COLOR)
        ax.set_title(METHOD_LABEL.get(method, method), loc="left", fontsize=10)
    for ax in list(axes.flat)[len(methods):]:
        ax.set_visible(False)
    fig.suptitle(title or "Removing the lowest activations: MSE (red) and CE (blue); "
                 "dotted: clean CE", x=0.01, ha="left", fontsize=11)
    fig.tight_layout()
    return save_png(fig, path, dpi=110)


def methods_ce_vs_l0(table: pd.DataFrame, path, ce_clean: float | None = None,
                     title: str | None = None) -> Path:
    """All methods' CE-vs-L0 curves on one figure (log L0; L0 = 0 points left out)."""
    _check(table)
    fig, ax = plt.subplots(figsize=(8, 5))
    clean = _ce_clean(table, ce_clean)
    for method, sub in table[table["l0"] > 0].groupby("method", sort=False):
        sub = sub.sort_values("parameter")
        ax.plot(sub["l0"], sub["ce_sae"], "o-", ms=3.5, lw=1.6,
                color=METHOD_COLOR.get(method), label=METHOD_LABEL.get(method, method))
        first = sub[sub["parameter"] == 0]
        ax.scatter(first["l0"], first["ce_sae"], s=60, color="black", zorder=3)
    if clean is not None:
        ax.axhline(clean, color="grey", lw=1, ls=":", label=f"clean CE {clean:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("L0 (active features per token)")
    ax.set_ylabel("CE with SAE spliced in (nats)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(frameon=False, fontsize=9)
    ax.set_title(title or "Four ways to remove low activations (black dot: no removal)",
                 loc="left", fontsize=11)
    return save_png(fig, path, dpi=110)
