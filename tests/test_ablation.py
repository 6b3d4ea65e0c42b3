"""The four removal methods: extremes, monotone L0, exact semantics; sweep, figures, CLI."""

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.image import imread
from test_evaluate import train_small_sae

from raysae.analysis import ablation_plots
from raysae.cli import main as cli_main
from raysae.evaluation import ablation
from raysae.evaluation.ablation import (
    METHODS,
    Calibration,
    ablation_sweep,
    calibrate,
    threshold_sweep,
)
from raysae.evaluation.feature_stats import NonzeroIndex
from raysae.evaluation.spliced_ce import Evaluator
from raysae.lm import corpus

HOOK = "blocks.0.hook_resid_post"
CTX = 32


def sparse_acts(n=400, d=48, seed=0):
    """Random non-negative activations, ~25% active, with some exact ties."""
    gen = torch.Generator().manual_seed(seed)
    f = torch.rand(n, d, generator=gen) * (torch.rand(n, d, generator=gen) < 0.25)
    f[:5, :4] = 0.5
    return f


def cal_of(f):
    return Calibration(NonzeroIndex.from_batches([f], f.shape[1]))


def l0(f):
    return (f > 0).float().sum(-1).mean().item()


@pytest.mark.parametrize("method", METHODS)
def test_extremes_and_monotone_l0_on_synthetic_activations(method):
    f = sparse_acts()
    cal = cal_of(f)
    grid = ablation.default_grid(method, cal, n_points=12)
    l0s = [l0(ablation.make_transform(method, p, cal)(f)) for p in grid]
    assert grid[0] == 0 and l0s[0] == l0(f)
    assert torch.equal(ablation.make_transform(method, 0, cal)(f), f)
    assert l0s[-1] == 0
    assert all(a >= b for a, b in zip(l0s, l0s[1:], strict=False))
    assert len(set(l0s)) >= 5  # the grid spreads over the range, not only the two ends


def test_lowest_k_keeps_each_tokens_largest():
    f = sparse_acts()
    for k in (1, 3, 100):
        out = ablation.lowest_k(f, k)
        n = (f > 0).sum(-1)
        assert torch.equal((out > 0).sum(-1), (n - k).clamp_min(0))
        kept = out > 0
        assert torch.equal(out[kept], f[kept])  # survivors unchanged
        for t in range(0, len(f), 37):  # every removed value <= every kept one
            removed = f[t][(f[t] > 0) & ~kept[t]]
            if kept[t].any() and len(removed):
                assert removed.max() <= f[t][kept[t]].min()


def test_feature_wise_thresholds_match_their_definitions():
    f = sparse_acts()
    cal = cal_of(f)
    fmax = f.max(0).values
    out = ablation.percent_of_max(f, 0.4, cal.feature_max)
    assert torch.equal(out, torch.where(f > 0.4 * fmax, f, 0))
    q = 0.3
    want = torch.tensor([torch.quantile(f[:, i][f[:, i] > 0], q).item() for i in range(48)])
    torch.testing.assert_close(cal.quantile_thresholds(q), want)
    assert torch.equal(ablation.quantile(f, q, cal), torch.where(f > want, f, 0))
    assert torch.equal(ablation.global_threshold(f, 0.25), torch.where(f > 0.25, f, 0))


def test_bad_parameters_raise_value_errors():
    cal = cal_of(sparse_acts())
    for method, bad in (("lowest_k", 1.5), ("lowest_k", -1), ("quantile", 1.2),
                        ("percent_of_max", -0.1), ("global_threshold", -1), ("nope", 0.1)):
        with pytest.raises(ValueError):
            ablation.make_transform(method, bad, cal)
    with pytest.raises(ValueError, match="n_points"):
        ablation.default_grid("quantile", cal, n_points=1)


@pytest.fixture(scope="module")
def trained(tiny_model):
    """A small SAE trained on the tiny model's train-split activations (~1 s)."""
    return train_small_sae(tiny_model)


@pytest.fixture(scope="module")
def evaluator(tiny_model):
    return Evaluator(tiny_model, HOOK, corpus.heldout_blocks(tiny_model, CTX, max_blocks=10),
                     batch_size=5)


@pytest.fixture(scope="module")
def sweep(evaluator, trained):
    return ablation_sweep(evaluator, trained, n_points=6)


def test_sweep_on_trained_sae_spans_original_to_zero_l0(sweep, evaluator, trained):
    assert list(sweep.columns) == list(ablation.columns())
    base = evaluator.evaluate(trained)
    assert set(sweep["method"]) == set(METHODS)
    for method, sub in sweep.groupby("method"):
        sub = sub.sort_values("parameter")
        assert sub["parameter"].iloc[0] == 0
        assert sub["l0"].iloc[0] == pytest.approx(base["l0"])
        assert sub["ce_sae"].iloc[0] == pytest.approx(base["ce_sae"])
        assert sub["l0"].iloc[-1] == 0, method
        assert (np.diff(sub["l0"].to_numpy()) <= 1e-9).all(), method
        assert sub["ce_sae"].iloc[-1] > sub["ce_sae"].iloc[0]  # removing everything hurts
    assert sweep.attrs["ce_clean"] == evaluator.ce_clean
    empty = sweep[sweep["l0"] == 0]
    assert len(empty) == len(METHODS)
    assert (empty["ce_sae"] == evaluator.evaluate(trained, torch.zeros_like)["ce_sae"]).all()


def test_sweep_evaluates_shared_end_points_once(evaluator, trained, monkeypatch):
    calls = []
    evaluate = evaluator.evaluate
    monkeypatch.setattr(evaluator, "evaluate", lambda *a, **k: calls.append(1) or evaluate(*a, **k))
    table = ablation_sweep(evaluator, trained, n_points=3)
    assert len(table) == 3 * len(METHODS)
    assert len(calls) == 2 + len(METHODS)  # one unablated, one all-removed, one middle each


def test_threshold_sweep_custom_grid(evaluator, trained):
    table = threshold_sweep(evaluator, trained, "global_threshold", grid=[0.0, 0.1, 1e9])
    assert table["parameter"].tolist() == [0.0, 0.1, 1e9]
    assert table["l0"].iloc[-1] == 0 and table["l0"].iloc[0] > table["l0"].iloc[1] > 0
    with pytest.raises(ValueError, match="unknown"):
        ablation_sweep(evaluator, trained, methods=["median"])
    # A calibration set other than the evaluation set is accepted.
    cal = calibrate(torch.randn(500, trained.cfg.d_in), trained)
    assert len(threshold_sweep(evaluator, trained, "quantile", n_points=3, calibration=cal)) == 3


def test_figures_are_written_and_open(sweep, tmp_path):
    a = ablation_plots.removal_strength(sweep, tmp_path / "removal.png")
    b = ablation_plots.methods_ce_vs_l0(sweep, tmp_path / "methods.png")
    for path in (a, b):
        img = imread(path)
        assert img.shape[0] > 300 and img.shape[1] > 500 and img.std() > 0.01
    with pytest.raises(ValueError, match="columns"):
        ablation_plots.methods_ce_vs_l0(pd.DataFrame({"l0": [1.0]}), tmp_path / "x.png")


def test_cli_writes_table_figures_and_statistics(tiny_model_dir, trained, tmp_path, capsys):
    sae_dir = trained.save(tmp_path / "sae", metadata={"model_name": str(tiny_model_dir),
                                                       "hook_name": HOOK})
    out = tmp_path / "out"
    code = cli_main(["ablation", str(sae_dir), "--out", str(out), "--n-blocks", "6",
                     "--n-points", "4", "--device", "cpu", "--feature-tokens", "1000"])
    assert code == 0
    table = pd.read_parquet(out / "ablations.parquet")
    assert set(table["method"]) == set(METHODS) and (table.groupby("method")["l0"].min() == 0).all()
    for name in ("removal_strength.png", "methods_ce_vs_l0.png", "feature_stats.parquet",
                 "activation_samples.parquet", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    assert "ce_clean" in capsys.readouterr().out
    assert cli_main(["ablation", str(tmp_path / "missing")]) == 2
