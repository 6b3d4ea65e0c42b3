"""Removing the lowest feature activations after training (the study's four methods) + sweeps.

Each method maps feature activations f [tokens, d_sae] (and per-feature statistics where it
needs them) to ablated activations; an activation survives only if it is above its
threshold (``f > t``), so parameter 0 removes nothing and the top of each grid removes
everything:

1. ``lowest_k``: per token, remove the k smallest active features (keep the top L0-k);
   k >= the token's L0 removes all of it.
2. ``percent_of_max``: remove f_i <= fraction * max_i, max_i = feature i's largest
   activation on the calibration set (fraction 1 removes all of it there).
3. ``quantile``: remove f_i <= the q-quantile of feature i's nonzero calibration activations
   (q = 0 removes nothing by definition; q = 1 is max_i).
4. ``global_threshold``: remove f_i <= t for one t shared by all features.

Features that never fired on the calibration set have no statistics and are never removed
by methods 2 and 3. The calibration set defaults to the evaluator's own held-out
activations. L0 never increases along a grid (thresholds only grow).

Device work: calibration statistics are gathered on the SAE's device and copied to the host
once; a transform moves its thresholds to the features' device on its first call, not per
batch (a blocking copy waits for the device); ``removes_everything`` reads one flag for all
batches. Each sweep point is one ``Evaluator.evaluate``, itself one host read.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from raysae.core.metrics import metric_names
from raysae.evaluation.feature_stats import NonzeroIndex, feature_batches
from raysae.evaluation.spliced_ce import Evaluator, Transform

METHODS = ("lowest_k", "percent_of_max", "quantile", "global_threshold")
LOWEST_K_SPAN = 0.95  # lowest_k: k evenly spaced up to this quantile of token L0, then the max
PER_SAE = ("ce_clean", "ce_zero")
"""The evaluator's values that do not change along a curve: the table's attrs, not columns."""


def columns() -> tuple[str, ...]:
    """A removal curve's columns: method, parameter, then every metric of the metrics
    table that the evaluator computes per point (read at call time: plugins add metrics)."""
    return ("method", "parameter", *(n for n in metric_names()
                                     if n in Evaluator.metric_names() and n not in PER_SAE))


def lowest_k(f: torch.Tensor, k: int) -> torch.Tensor:
    """Zero the k smallest nonzero activations of each token (ties: higher feature index first)."""
    k = int(k)
    if k <= 0:
        return f
    order = torch.argsort(f, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(f.shape[-1], device=f.device).expand_as(order))
    keep = rank < ((f > 0).sum(dim=-1, keepdim=True) - k)
    return torch.where(keep, f, torch.zeros_like(f))


def above(f: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """Keep activations strictly above ``threshold`` (scalar or per-feature [d_sae])."""
    return torch.where(f > threshold, f, torch.zeros_like(f))


def percent_of_max(f: torch.Tensor, fraction: float, feature_max: torch.Tensor) -> torch.Tensor:
    """Remove each feature's activations at or below ``fraction`` of its calibration max."""
    return above(f, fraction_thresholds(fraction, feature_max).to(f.device))


def quantile(f: torch.Tensor, q: float, calibration: Calibration) -> torch.Tensor:
    """Remove each feature's activations at or below its q-quantile (nonzero calibration)."""
    return above(f, calibration.quantile_thresholds(q).to(f.device))


def global_threshold(f: torch.Tensor, threshold: float) -> torch.Tensor:
    """Remove every activation at or below ``threshold``."""
    return above(f, float(threshold))


def fraction_thresholds(fraction: float, feature_max: torch.Tensor) -> torch.Tensor:
    if not 0 <= fraction <= 1:
        raise ValueError(f"percent_of_max fraction={fraction} must lie in [0, 1]")
    return fraction * feature_max.float()


class Calibration:
    """Per-feature statistics the feature-wise methods need, from a calibration set."""

    def __init__(self, index: NonzeroIndex):
        self.index = index
        self.feature_max = index.quantile(1.0).nan_to_num(0.0)
        self._quantiles: dict[float, torch.Tensor] = {}

    @property
    def max_token_l0(self) -> int:
        return self.index.max_token_l0

    def quantile_thresholds(self, q: float) -> torch.Tensor:
        if q not in self._quantiles:
            thr = self.index.quantile(q).nan_to_num(0.0) if q > 0 else torch.zeros_like(
                self.feature_max)
            self._quantiles[q] = thr
        return self._quantiles[q]


def calibrate(source, sae, n_tokens: int | None = None) -> Calibration:
    """Statistics of ``sae``'s features on ``source`` (an Evaluator, tensor or batches)."""
    return Calibration(NonzeroIndex.from_batches(feature_batches(source, sae, n_tokens),
                                                 sae.cfg.d_sae))


def _above_thresholds(thr: torch.Tensor) -> Transform:
    """``above(f, thr)`` with ``thr`` moved to f's device once per device, not per call."""
    moved: dict[torch.device, torch.Tensor] = {}

    def transform(f: torch.Tensor) -> torch.Tensor:
        if f.device not in moved:
            moved[f.device] = thr.to(f.device)
        return above(f, moved[f.device])

    return transform


def make_transform(method: str, parameter: float, calibration: Calibration) -> Transform:
    """The ablation ``method`` at ``parameter`` as a function of f (thresholds precomputed)."""
    if method == "lowest_k":
        if parameter < 0 or parameter != int(parameter):
            raise ValueError(f"lowest_k parameter k={parameter} must be an integer >= 0")
        return lambda f: lowest_k(f, int(parameter))
    if method == "percent_of_max":
        thr = fraction_thresholds(parameter, calibration.feature_max)
    elif method == "quantile":
        if not 0 <= parameter <= 1:
            raise ValueError(f"quantile q={parameter} must lie in [0, 1]")
        thr = calibration.quantile_thresholds(parameter)
    elif method == "global_threshold":
        if parameter < 0:
            raise ValueError(f"global_threshold={parameter} must be >= 0")
        return lambda f: global_threshold(f, parameter)
    else:
        raise ValueError(f"ablation method {method!r} is unknown; choose from {METHODS}")
    return _above_thresholds(thr)


def default_grid(method: str, calibration: Calibration, n_points: int = 10) -> list[float]:
    """``n_points`` parameters from 0 (nothing removed) to the value that removes everything.

    percent_of_max and quantile: evenly spaced in [0, 1]. lowest_k: k evenly spaced up to the
    95th percentile of the calibration set's per-token L0, then its max. global_threshold: the
    values at evenly spaced quantiles of all nonzero calibration activations, ending at the
    max. So the points spread over L0 instead of crowding where nothing changes (a long tail
    of L0 or of activations). Duplicate values are dropped (fewer points, never more).
    """
    if n_points < 2:
        raise ValueError(f"n_points={n_points} must be >= 2 (0 and the full removal)")
    levels = np.linspace(0.0, 1.0, n_points)[1:]
    if method == "lowest_k":
        token_l0 = calibration.index.token_l0.numpy()
        if not len(token_l0):
            return [0.0]
        top = np.quantile(token_l0, LOWEST_K_SPAN)
        ks = np.round(np.linspace(0.0, top, n_points - 1)).tolist() + [token_l0.max()]
        return [float(k) for k in np.unique(ks)]
    if method in ("percent_of_max", "quantile"):
        return [0.0] + [float(v) for v in levels]
    if method == "global_threshold":
        values = calibration.index.values.numpy()
        if not len(values):
            return [0.0]
        return [0.0] + [float(t) for t in np.unique(np.quantile(values, levels))]
    raise ValueError(f"ablation method {method!r} is unknown; choose from {METHODS}")


def _row(method: str, parameter: float, result: dict) -> dict:
    return {"method": method, "parameter": float(parameter),
            **{k: float(result[k]) for k in columns()[2:]}}


def _frame(rows: list[dict], evaluator: Evaluator) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(columns()))
    df.attrs.update(ce_clean=evaluator.ce_clean, ce_zero=evaluator.ce_zero,
                    n_tokens=evaluator.n_tokens)
    return df


def removes_everything(evaluator: Evaluator, sae, transform: Transform) -> bool:
    """Whether ``transform`` leaves no active feature on the evaluator's tokens (an encode
    pass, a few % of one CE evaluation; one host read at the end)."""
    left = [transform(f).any() for f in feature_batches(evaluator, sae, None)]
    return not bool(torch.stack(left).any())


def threshold_sweep(evaluator: Evaluator, sae, method: str = "global_threshold",
                    grid: Sequence[float] | None = None, n_points: int = 10,
                    calibration: Calibration | None = None,
                    shared: dict | None = None) -> pd.DataFrame:
    """Evaluate ``method`` at every parameter of ``grid`` (default: ``default_grid``).

    The unablated point (parameter 0) and the all-removed point (the grid's last, when it
    removes every activation) give the same numbers for every method; they are evaluated
    once and kept in ``shared`` (pass one dict to several sweeps to share them).
    """
    if method not in METHODS:
        raise ValueError(f"ablation method {method!r} is unknown; choose from {METHODS}")
    calibration = calibration or calibrate(evaluator, sae)
    grid = list(default_grid(method, calibration, n_points) if grid is None else grid)
    shared = {} if shared is None else shared
    rows = []
    for i, parameter in enumerate(grid):
        transform = make_transform(method, parameter, calibration)
        key = "none" if parameter == 0 else None
        if i == len(grid) - 1 and key is None and removes_everything(evaluator, sae, transform):
            key = "all"
        if key is None:
            result = evaluator.evaluate(sae, transform)
        else:
            if key not in shared:
                shared[key] = evaluator.evaluate(sae, None if key == "none" else transform)
            result = shared[key]
        rows.append(_row(method, parameter, result))
    return _frame(rows, evaluator)


def ablation_sweep(evaluator: Evaluator, sae, methods: Sequence[str] = METHODS,
                   n_points: int = 10, calibration: Calibration | None = None) -> pd.DataFrame:
    """All ``methods`` over their default grids; shared end points are evaluated once."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"ablation methods {unknown} are unknown; choose from {METHODS}")
    calibration = calibration or calibrate(evaluator, sae)
    shared: dict = {}
    tables = [threshold_sweep(evaluator, sae, m, n_points=n_points, calibration=calibration,
                              shared=shared) for m in methods]
    return _frame([r for t in tables for r in t.to_dict("records")], evaluator)
