"""Tests of raysae.analysis.pareto, plus the synthetic results folder the plot/report tests share.

``make_results`` writes tables in the search service's schema, with known ground truth:
sqrt's front crosses L1's at L0 = 15 (better above), sqrt(sqrt) is worse than sqrt, and
searched power penalties near p = 0.45, eps = 0.1 beat both.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from optuna._hypervolume import compute_hypervolume

from raysae.analysis import pareto
from raysae.results import contract

CE_CLEAN, CE_ZERO, CROSS = 4.02, 7.5, 15.0
TARGETS = (8.0, 16.0, 32.0, 64.0)


def ce_l1(l0):
    return CE_CLEAN + 1.6 * np.asarray(l0, float) ** -0.45

SPACE = [{"name": "power.p", "family": "power", "low": 0.1, "high": 1.0, "log": False},
         {"name": "power.eps", "family": "power", "low": 1e-3, "high": 10.0, "log": True}]


def ce_true(family, l0, p=1.0, s=1.0):
    """Noise-free CE of the synthetic world; the searched gain peaks at p=0.45, s=0.1."""
    base, x = ce_l1(l0), np.log(np.asarray(l0, float))
    if family == "sqrt":
        return base - 0.04 * (x - np.log(CROSS))
    if family == "sqrt(sqrt)":
        return base - 0.03 * (x - np.log(60.0))
    if family == "power":
        gain = np.exp(-((p - 0.45) / 0.25) ** 2 - (np.log10(s) + 1) ** 2 / 2)
        return base - 0.045 * (x - np.log(6.0)) * gain - 0.01
    return base


def _trial_rows(rng, family, n, p, s, mode, targets=None):
    rows = []
    for i in range(n):
        pp = rng.uniform(0.25, 0.95) if p is None else p
        ss = 10 ** rng.uniform(-2, 1) if s is None else s
        tgt = targets[i % len(targets)] if targets else np.nan
        l0 = tgt * np.exp(rng.normal(0, 0.08)) if targets else np.exp(rng.uniform(1.1, 5.5))
        ce = float(ce_true(family, l0, pp, ss)) + abs(rng.normal(0, 0.006))
        fvu = 0.6 * l0 ** -0.55 * (0.85 if family != "L1" else 1.0)
        l2 = (0.72 if family == "L1" else 0.86) + 0.04 * np.log10(l0)
        rows.append({
            "penalty": "power", "p": pp, "eps": 0.0 if p is not None else ss,
            "label": family if p is not None else f"power(p={pp:.3g}, eps={ss:.3g})",
            "experiment": "syn_refs" if p is not None else "syn",
            "lam": 0.02 * (l0 / 30) ** -1.4,
            "lambda_mode": mode, "target_l0": tgt, "family": family, "l0": l0,
            "ce_clean": CE_CLEAN, "ce_sae": ce, "ce_zero": CE_ZERO,
            "ce_recovered": (CE_ZERO - ce) / (CE_ZERO - CE_CLEAN), "mse": 0.9 * fvu, "fvu": fvu,
            "cos_sim": 1 - fvu / 2, "l2_ratio": l2, "dead_fraction": rng.uniform(0, 0.05),
            "objective": ce, "tokens_seen": 1_000_000})
    return rows


def make_trials(seed: int = 0, n_searched: int = 32) -> pd.DataFrame:
    """A trials table in the search service's schema, with 3 unfinished rows at the end."""
    rng = np.random.default_rng(seed)
    rows = (_trial_rows(rng, "L1", 12, 1.0, 1.0, "fixed")
            + _trial_rows(rng, "sqrt", 12, 0.5, 1.0, "fixed")
            + _trial_rows(rng, "sqrt(sqrt)", 8, 0.25, 1.0, "fixed")
            + _trial_rows(rng, "power", n_searched, None, None, "control", TARGETS))
    for status in ("diverged", "diverged", "error"):
        bad = dict(rows[-1], family="power", status=status)
        bad.update({k: np.nan for k in ("l0", "ce_sae", "fvu", "mse", "objective")})
        rows.append(bad)
    df = pd.DataFrame(rows)
    df["status"] = df.get("status", pd.Series(dtype=str)).fillna("finished")
    df.insert(0, "trial_id", [f"t{i:03d}" for i in range(len(df))])
    df["trial_dir"] = [f"/nonexistent/{t}" for t in df["trial_id"]]
    df["checkpoint_path"] = df["trial_dir"] + "/checkpoint"
    return df


def make_ablations(trials: pd.DataFrame) -> pd.DataFrame:
    """Global-threshold sweeps for every finished SAE and all four methods for the first."""
    rows = []
    done = trials[trials["status"] == "finished"]
    for k, t in enumerate(done.itertuples()):
        methods = ["global_threshold"]
        if k == 0:
            methods += ["lowest_k", "percent_of_max", "quantile"]
        for j, method in enumerate(methods):
            for param in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8):
                l0 = t.l0 * np.exp(-1.6 * param)
                cost = (ce_l1(l0) - ce_l1(t.l0)) * (1.1 + 0.15 * j)
                ce = t.ce_sae + cost
                rows.append({
                    "trial_id": t.trial_id, "method": method, "parameter": param, "l0": l0,
                    "mse": t.mse * (1 + 2 * param), "fvu": t.fvu * (1 + 2 * param),
                    "ce_sae": ce, "ce_recovered": (CE_ZERO - ce) / (CE_ZERO - CE_CLEAN),
                    "cos_sim": t.cos_sim - 0.05 * param, "l2_ratio": t.l2_ratio})
    return pd.DataFrame(rows)


def make_results(root, seed: int = 0, n_searched: int = 32, extras: bool = True):
    """Write a complete synthetic results directory under root; return root."""
    rng = np.random.default_rng(seed + 1)
    trials = make_trials(seed, n_searched)
    trials.to_parquet(root / "trials.parquet")
    search = {"name": "synthetic", "kind": "target", "objective": "target",
              "lambda_mode": "control", "targets": list(TARGETS), "penalties": ["power"],
              "space": SPACE, "references": [], "settings": {"search": {"num_trials": 32}}}
    contract.write_search_json(root, search)
    if not extras:
        return root
    make_ablations(trials).to_parquet(root / "ablations.parquet")
    done = trials[trials["status"] == "finished"]
    med = {"L1": 0.28, "sqrt": 0.43, "sqrt(sqrt)": 0.5, "power": 0.38}
    fs, acts = [], []
    for t in done.itertuples():
        lf = rng.normal(np.log10(t.l0 / 256), 0.9 if t.family == "L1" else 1.2, 256)
        freq = np.where(rng.random(256) < 0.03, 0.0, 10 ** np.minimum(lf, 0))
        fs.append(pd.DataFrame({"trial_id": t.trial_id, "feature": np.arange(256),
                                "frequency": freq, "median_nonzero": rng.lognormal(-1, 0.5, 256)}))
        act = rng.lognormal(np.log(med[t.family]), 0.8, 600)
        acts.append(pd.DataFrame({"trial_id": t.trial_id, "activation": act}))
    pd.concat(fs).to_parquet(root / "feature_stats.parquet")
    pd.concat(acts).to_parquet(root / "activation_samples.parquet")
    return root


def brute_force_mask(pts: np.ndarray) -> np.ndarray:
    """O(n^2) check: i is kept unless some j weakly dominates it strictly somewhere."""
    n = len(pts)
    keep = np.ones(n, bool)
    for i in range(n):
        for j in range(n):
            if np.all(pts[j] <= pts[i]) and np.any(pts[j] < pts[i]):
                keep[i] = False
                break
    return keep


@pytest.mark.parametrize("seed", range(6))
def test_nondominated_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    pts = rng.random((150, 2))
    if seed % 2:  # coarse grid: ties and exact duplicates
        pts = np.round(pts * 8) / 8
    mask = pareto.nondominated(pts[:, 0], pts[:, 1])
    expected = {tuple(r) for r in pts[brute_force_mask(pts)]}
    assert {tuple(r) for r in pts[mask]} == expected
    assert mask.sum() == len(expected)  # duplicates on the front counted once


def test_family_and_overall_fronts_match_brute_force():
    pts = pareto.points_table(make_trials(3), make_ablations(make_trials(3)))
    frs = pareto.fronts(pts)
    assert set(frs) == {"L1", "sqrt", "sqrt(sqrt)", "power", "overall"}
    for fam, fr in frs.items():
        sub = pts if fam == "overall" else pts[pts["family"] == fam]
        xy = sub[["l0", "ce_sae"]].to_numpy()
        assert {tuple(r) for r in fr[["l0", "ce_sae"]].to_numpy()} == \
            {tuple(r) for r in xy[brute_force_mask(xy)]}
        assert np.all(np.diff(fr["l0"]) > 0) and np.all(np.diff(fr["ce_sae"]) < 0)
    fvu = pareto.front(pts, "fvu")
    xy = pts[["l0", "fvu"]].to_numpy()
    assert len(fvu) == len({tuple(r) for r in xy[brute_force_mask(xy)]})


@pytest.mark.parametrize("seed", range(4))
def test_hypervolume_matches_optuna(seed):
    rng = np.random.default_rng(seed)
    pts = pd.DataFrame({"l0": np.exp(rng.uniform(0, 5, 60)), "ce_sae": rng.uniform(4, 6, 60),
                        "family": "L1"})
    ref = pareto.reference_point(pts)
    obj = np.column_stack([np.log10(pts["l0"]), pts["ce_sae"]])
    expected = compute_hypervolume(obj, ref)
    assert pareto.hypervolume(pareto.front(pts), ref) == pytest.approx(expected, rel=1e-12)
    assert pareto.hypervolume(pts, ref) == pytest.approx(expected, rel=1e-12)  # dominated ignored


def test_hypervolumes_share_a_reference_that_bounds_all_points():
    pts = pareto.points_table(make_trials(1))
    hv = pareto.hypervolumes(pts).set_index("family")
    ref = pareto.reference_point(pts)
    assert np.all(np.log10(pts["l0"]) < ref[0]) and np.all(pts["ce_sae"] < ref[1])
    assert hv.loc["overall", "hypervolume"] >= hv["hypervolume"].drop("overall").max()
    for fam in ("L1", "sqrt", "power"):
        fr = pareto.front(pts, family=fam)
        obj = np.column_stack([np.log10(fr["l0"]), fr["ce_sae"]])
        assert hv.loc[fam, "hypervolume"] == pytest.approx(compute_hypervolume(obj, ref))


def _linear_points():
    """L1: 5 - 0.2 ln L0, sqrt: 5.3 - 0.3 ln L0 (they cross at e^3), at scattered L0s."""
    rng = np.random.default_rng(7)
    l1 = np.sort(np.exp(np.r_[0.5, rng.uniform(0.5, 5.5, 7), 5.5]))
    sq = np.sort(np.exp(np.r_[1.0, rng.uniform(1.0, 5.0, 5), 5.0]))
    return pd.DataFrame({
        "trial_id": [f"a{i}" for i in range(9)] + [f"b{i}" for i in range(7)],
        "status": "finished", "family": ["L1"] * 9 + ["sqrt"] * 7,
        "l0": np.r_[l1, sq], "ce_sae": np.r_[5 - 0.2 * np.log(l1), 5.3 - 0.3 * np.log(sq)],
        "p": [1.0] * 9 + [0.5] * 7, "eps": 0.0, "lam": 0.1})


def test_matched_l0_is_exact_on_linear_data():
    trials = _linear_points()
    curves = pareto.matched_l0(pareto.points_table(trials))
    g = curves["l0"].to_numpy()
    l1_dom = (g >= trials["l0"][:9].min()) & (g <= trials["l0"][:9].max())
    sq_dom = (g >= trials["l0"][9:].min()) & (g <= trials["l0"][9:].max())
    np.testing.assert_allclose(curves["L1"][l1_dom], 5 - 0.2 * np.log(g[l1_dom]), atol=1e-12)
    np.testing.assert_allclose(curves["sqrt"][sq_dom], 5.3 - 0.3 * np.log(g[sq_dom]), atol=1e-12)
    assert curves["L1"][~l1_dom].isna().all() and curves["sqrt"][~sq_dom].isna().all()
    both = l1_dom & sq_dom
    np.testing.assert_allclose(curves["delta_sqrt"][both], 0.3 - 0.1 * np.log(g[both]), atol=1e-12)
    cross = pareto.crossovers(curves, "sqrt")
    assert len(cross) == 1 and cross["better_above"][0] == "sqrt"
    assert cross["l0"][0] == pytest.approx(np.exp(3.0), rel=1e-9)
    wins = pareto.win_ranges(curves, ["L1", "sqrt"])
    assert list(wins["family"]) == ["L1", "sqrt", "L1"]  # L1 alone beyond sqrt's range
    assert wins["l0_to"][0] == pytest.approx(np.exp(3.0)) == wins["l0_from"][1]
    assert wins["max_margin"][1] == pytest.approx(0.1 * np.log(trials["l0"][9:].max()) - 0.3)


def test_summary_table_savings_are_exact_on_linear_data():
    trials = pd.concat([_linear_points(), pd.DataFrame({
        "trial_id": ["c0"], "status": "finished", "family": "power", "l0": [30.0],
        "ce_sae": [4.0], "p": [0.4], "eps": [0.1], "lam": [0.3]})], ignore_index=True)
    pts = pareto.points_table(trials)
    table = pareto.summary_table(trials, pts, [30.0, 1000.0])
    assert list(table["target_l0"]) == [30.0, 1000.0]
    row = table.iloc[0]
    assert row["trial_id"] == "c0" and row["p"] == 0.4
    assert row["saved_vs_L1"] == pytest.approx(5 - 0.2 * np.log(30) - 4.0, abs=1e-12)
    assert row["saved_vs_sqrt"] == pytest.approx(5.3 - 0.3 * np.log(30) - 4.0, abs=1e-12)
    assert table.iloc[1]["n_near"] == 0 and pd.isna(table.iloc[1]["trial_id"])


def test_points_table_rules():
    trials = make_trials(2)
    ab = make_ablations(trials)
    ab = pd.concat([ab, ab.iloc[[1]].assign(l0=0.0)])  # everything removed: no log(L0)
    pts = pareto.points_table(trials, ab)
    assert not set(trials.loc[trials["status"] != "finished", "trial_id"]) & \
        set(pts.loc[pts["source"] == "trial", "trial_id"])
    abl = pts[pts["source"] == "ablation"]
    assert (abl["parameter"] > 0).all() and (pts["l0"] > 0).all()
    assert len(abl) == 5 * (trials["status"] == "finished").sum()  # global_threshold only
    assert (abl.merge(trials[["trial_id", "family"]], on="trial_id")
            .pipe(lambda d: (d["family_x"] == d["family_y"]).all()))
    n_done = (trials["status"] == "finished").sum()
    assert len(pareto.points_table(trials, ab, method=None)) == n_done


def test_synthetic_crossover_and_summary():
    trials = make_trials(0)
    pts = pareto.points_table(trials)
    curves = pareto.matched_l0(pts)
    cross = pareto.crossovers(curves, "sqrt")
    assert len(cross) >= 1
    up = cross[cross["better_above"] == "sqrt"]["l0"]
    assert up.min() == pytest.approx(CROSS, rel=0.3)
    table = pareto.summary_table(trials, pts, pareto.default_targets(trials, pts))
    assert list(table["target_l0"]) == list(TARGETS)
    assert (table["saved_vs_L1"].dropna() > 0).all()


def test_load_results_validates(tmp_path):
    with pytest.raises(ValueError, match="trials.parquet not found"):
        pareto.load_results(tmp_path)
    make_trials().drop(columns=["ce_sae"]).to_parquet(tmp_path / "trials.parquet")
    with pytest.raises(ValueError, match="ce_sae"):
        pareto.load_results(tmp_path)
    make_results(tmp_path)
    res = pareto.load_results(tmp_path)
    assert res.search["objective"] == "target" and res.ablations is not None
    assert set(res.activation_samples.columns) == {"trial_id", "activation"}


def test_switch_point_gives_one_number_per_family():
    curves = pareto.matched_l0(pareto.points_table(_linear_points()))
    up = pareto.switch_point(curves, "sqrt")
    assert up["side"] == "above" and up["l0"] == pytest.approx(np.exp(3.0))
    assert up["n_crossings"] == 1 and up["max_gain"] == pytest.approx(0.2)
    assert up["max_gain_l0"] == pytest.approx(np.exp(5.0))
    down = pareto.switch_point(curves, "L1", baseline="sqrt")
    assert down["side"] == "below" and down["l0"] == pytest.approx(np.exp(3.0))
    assert pareto.switch_point(curves, "sqrt(sqrt)")["side"] == "nowhere"


def test_win_ranges_tolerance_ignores_noise_between_equal_fronts():
    l0 = np.geomspace(2, 200, 301)
    a = 5 - 0.2 * np.log(l0)
    wiggle = 0.002 * (-1.0) ** np.arange(len(l0))
    b = a + np.where(l0 < 20, wiggle, -0.02 * np.log(l0 / 20))
    curves = pd.DataFrame({"l0": l0, "A": a, "B": b})
    assert len(pareto.win_ranges(curves, ["A", "B"])) > 50  # exact: every wiggle flips
    wins = pareto.win_ranges(curves, ["A", "B"], tol=0.005)
    assert list(wins["family"]) == ["A", "B"]
    assert wins["l0_from"][1] == pytest.approx(20 * np.exp(0.25), rel=1e-9)
    assert wins["max_margin"][1] == pytest.approx(0.02 * np.log(10))


def test_switch_point_edge_cases():
    l0 = np.array([1.0, 10.0, 100.0])

    def frame(d):
        return pd.DataFrame({"l0": l0, "L1": 5.0, "X": 5.0 + np.asarray(d)})

    assert pareto.switch_point(frame([-0.1, 0.0, 0.0]), "X")["l0"] == 10.0  # touches, no cross
    sp = pareto.switch_point(frame([-0.1, -0.1, -0.1]), "X")
    assert sp["side"] == "everywhere" and np.isnan(sp["l0"])
    assert sp["max_gain"] == pytest.approx(0.1)
    assert pareto.switch_point(frame([0.1, -0.1, 0.1]), "X")["side"] == "middle"
    above = pareto.switch_point(frame([0.1, 0.0, -0.1]), "X")
    assert above["side"] == "above" and above["l0"] == 10.0
    assert pareto.switch_point(frame([0.1, -0.1, -0.1]), "X")["l0"] == pytest.approx(10 ** 0.5)
    assert pareto.switch_point(frame([0.1, 0.1, 0.1]), "nope")["side"] == "nowhere"


def test_default_targets_stay_inside_the_trained_l0_range():
    """Threshold sweeps reach L0 < 1; the summary's targets must not follow them there."""
    trials = pd.DataFrame({"trial_id": ["a", "b", "c"], "status": ["finished"] * 3,
                           "l0": [10.0, 20.0, 40.0], "ce_sae": [4.3, 4.2, 4.1]})
    points = pd.DataFrame({"l0": [0.1, 0.5, 10.0, 20.0, 40.0],
                           "ce_sae": [9.0, 7.0, 4.3, 4.2, 4.1]})
    targets = pareto.default_targets(trials, points)
    assert targets and min(targets) >= 10 and max(targets) <= 40
