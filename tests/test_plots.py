"""raysae.analysis.plots: every figure renders to a real, non-blank PNG from pareto's tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_pareto import make_ablations, make_results, make_trials

from raysae.analysis import pareto, plots, report


def _png(path, min_px: int = 300) -> np.ndarray:
    """Open a written PNG and check it is a picture, not an empty canvas."""
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_px * 0.6 and max(im.size) >= min_px
        arr = np.asarray(im.convert("RGB"), dtype=float)
    assert arr.std() > 5
    return arr


def _count_colour(arr: np.ndarray, hex_colour: str, tol: float = 30) -> int:
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)], float)
    return int((np.abs(arr - rgb).max(axis=2) < tol).sum())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_results(tmp_path_factory.mktemp("res"))
    res = pareto.load_results(root)
    return res, report.analyse(res)


def test_frontier_draws_each_family_in_its_colour(data, tmp_path):
    _, a = data
    arr = _png(plots.frontier(a["points"], a["fronts"], tmp_path / "f.png",
                              best=a["summary"], ce_clean=4.02))
    for fam in ("L1", "sqrt", "sqrt(sqrt)", "power"):
        assert _count_colour(arr, plots.style(fam)["color"]) > 200, fam
    one = a["points"][a["points"]["family"] == "L1"]
    arr1 = _png(plots.frontier(one, pareto.fronts(one), tmp_path / "one.png"))
    assert _count_colour(arr1, plots.style("sqrt")["color"]) == 0
    assert list(tmp_path.glob("*.png")) and not list(tmp_path.glob("tmp*"))  # temp renamed


def test_study_line_styles():
    assert plots.style("L1")["ls"] == "-" and plots.style("sqrt")["ls"] == ":"
    assert plots.style("something new") is plots.OTHER


def test_delta_metrics_and_fvu_figures(data, tmp_path):
    _, a = data
    _png(plots.delta_to_baseline(a["curves"], a["switch"], tmp_path / "d.png"))
    _png(plots.metrics_vs_l0(a["points"], tmp_path / "m.png"))
    _png(plots.frontier(a["points"], a["fronts_fvu"], tmp_path / "fvu.png", "fvu"))


def test_distribution_figures(data, tmp_path):
    res, _ = data
    reps = report.representatives(res.trials, res.feature_stats)
    assert set(reps) == {"L1", "sqrt", "sqrt(sqrt)", "power"}
    _png(plots.feature_frequency(res.feature_stats, reps, tmp_path / "ff.png"))
    s = res.activation_samples
    med = {f: float(s.loc[s.trial_id == t, "activation"].median()) for f, (t, _) in reps.items()}
    _png(plots.activation_hist(s, reps, med, tmp_path / "a.png"))
    dead = res.feature_stats.assign(frequency=0.0)  # every feature dead: still a figure
    _png(plots.feature_frequency(dead, reps, tmp_path / "dead.png"))


def test_search_and_ablation_figures(tmp_path):
    trials = make_trials(4)
    ab = make_ablations(trials)
    _png(plots.optuna_history(trials, tmp_path / "h.png"))
    _png(plots.optuna_history(trials, tmp_path / "hmax.png", direction="maximize"))
    _png(plots.importance({"power.p": 0.6, "power.eps": 0.3, "lam": 0.1}, tmp_path / "i.png"),
         min_px=150)
    fam = dict(zip(trials["trial_id"], trials["family"], strict=True))
    _png(plots.ablation_curves(ab, fam, tmp_path / "ab.png"))
    _png(plots.ablation_methods(ab, "t000", tmp_path / "methods.png"))


def test_frontier_accepts_missing_best_rows(data, tmp_path):
    _, a = data
    empty_best = pd.DataFrame({"l0": [np.nan], "ce_sae": [np.nan], "label": [np.nan],
                               "p": [np.nan]})
    _png(plots.frontier(a["points"], a["fronts"], tmp_path / "f.png", best=empty_best))
