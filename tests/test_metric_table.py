"""One metrics table (issue #25): a metric registered outside raysae (tests/toy_metric.py, a
plugin) reaches the evaluator, the results contract, trials.parquet of a real search, the
Pareto analysis, the report and the progress table with no other edit."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from search_helpers import use_plugin
from test_pareto import make_results

import raysae
from raysae.analysis import pareto, plots, report
from raysae.core import metrics
from raysae.core.config import SAEConfig
from raysae.core.metrics import metric_names
from raysae.core.sae import SAE
from raysae.evaluation.spliced_ce import Evaluator
from raysae.lm import corpus
from raysae.results import contract

ROOT = Path(raysae.__file__).resolve().parent
HOOK = "blocks.0.hook_resid_post"
TOY = "tests.toy_metric"


@pytest.fixture
def toy(monkeypatch):
    """The toy metric, for this test only (search_helpers.use_plugin)."""
    module = use_plugin(monkeypatch, TOY)
    metrics.remove_metric(module.NAME)  # its first import registered it; this test owns it
    metrics.add_metric(module.METRIC)
    yield module
    metrics.remove_metric(module.NAME)
    assert module.NAME not in contract.trial_columns(metric_names())


def test_the_evaluator_and_the_trainer_compute_a_registered_metric(toy, tiny_model):
    tokens = corpus.heldout_blocks(tiny_model, 32, max_blocks=6)
    ev = Evaluator(tiny_model, HOOK, tokens, batch_size=4)  # two batches, summed on the device
    torch.manual_seed(0)
    sae = SAE(SAEConfig(ev.d_in, 64))
    x = ev.activations()
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae.decode(f)
    want = (x - x_hat).abs().amax(dim=-1).mean().item()
    out = ev.evaluate(sae)
    assert list(out)[-1] == toy.NAME and type(out[toy.NAME]) is float
    assert out[toy.NAME] == pytest.approx(want, rel=1e-5)
    assert metrics.reconstruction_metrics(x, x_hat, f)[toy.NAME] == pytest.approx(want, rel=1e-5)
    assert out["fvu"] == pytest.approx(metrics.fvu(x, x_hat), rel=1e-5)  # the others unchanged


def test_the_contract_the_analysis_and_the_report_take_a_registered_metric(toy, tmp_path):
    make_results(tmp_path)
    trials = pd.read_parquet(tmp_path / contract.TRIALS_FILE)
    trials[toy.NAME] = 2.0 * trials["fvu"] ** 0.5
    trials.to_parquet(tmp_path / contract.TRIALS_FILE)
    assert toy.NAME in contract.trial_columns(metric_names())
    with pytest.raises(ValueError, match=toy.NAME):
        contract.write_trials(trials.drop(columns=toy.NAME), tmp_path / "other",
                              metric_names())
    pts = pareto.points_table(trials)
    assert toy.NAME in pts and len(pareto.front(pts, toy.NAME)) > 0
    assert (pareto.hypervolumes(pts, toy.NAME)["hypervolume"] > 0).all()
    assert plots.panel_metrics() == ["mse", "cos_sim", "l2_ratio"]  # frontier: its own figure
    text = report.write_report(tmp_path).read_text()
    assert f">{toy.NAME}</td>" in text  # its hypervolume rows
    assert f"Frontier of {toy.NAME}" in text and toy.METRIC.label in text
    assert (tmp_path / contract.FIGURES_DIR / f"frontier_{toy.NAME}.png").is_file()


def test_a_higher_is_better_metric_keeps_its_highest_values_on_the_front():
    """Direction comes from the table: cos_sim is higher-is-better, fvu lower."""
    pts = pd.DataFrame({"family": "L1", "l0": [1.0, 2.0, 3.0], "cos_sim": [0.5, 0.9, 0.7],
                        "fvu": [0.5, 0.9, 0.7]})
    assert list(pareto.front(pts, "cos_sim")["l0"]) == [1.0, 2.0]
    assert list(pareto.front(pts, "fvu")["l0"]) == [1.0]


def test_the_progress_table_shows_a_registered_metric(toy, tmp_path):
    from search_helpers import make_plan, make_spec

    from raysae.search.trial.trainable import _mean_row
    from raysae.search.tune_setup import progress_table

    spec = make_spec(activations=str(tmp_path), model="m", hook=HOOK, d_in=32, d_sae=128,
                     lambda_mode="control", targets=(4.0, 8.0))
    assert TOY in spec.plugins  # each trial imports it before training
    columns = progress_table(make_plan("p", str(tmp_path), spec), False)._metric_columns
    assert columns[toy.NAME] == toy.METRIC.progress
    assert list(columns)[:2] == ["tokens_seen", "ce_sae"] and list(columns)[-2:] == [
        "objective", "status"]
    rows = [{"l0": 4.0, "lam": 0.1, toy.NAME: 1.0}, {"l0": 8.0, "lam": 0.3, toy.NAME: 3.0}]
    assert _mean_row(rows)[toy.NAME] == pytest.approx(2.0)


def test_a_ray_search_writes_the_registered_metric(toy, tiny_model_dir, ray_local, tmp_path):
    """A real Tune trial in a Ray worker (about 30 s): it knows the metric only through the
    plugin list."""
    from search_helpers import make_plan, make_spec

    from raysae.activations.cache import build_cache
    from raysae.activations.source import ActivationSource
    from raysae.search.stages import run_search

    source = ActivationSource(model=str(tiny_model_dir), hook=HOOK, context_length=32,
                              n_tokens=4096, num_actors=1)
    cache = build_cache(source, tmp_path / "acts", progress=False)
    spec = make_spec(activations=str(cache), model=str(tiny_model_dir), hook=HOOK, d_in=32,
                     d_sae=64, context_length=32, total_tokens=4096, batch_size=256,
                     lambda_mode="fixed", eval_blocks=4, feature_tokens=512)
    plan = make_plan("toy", str(tmp_path / "tune"), spec, grid=({"p": 1.0, "lam": 1.0},))
    out = run_search(plan, tmp_path / "results")
    trials = contract.read_trials(out)
    assert set(trials["status"]) == {"finished"}
    assert (trials[toy.NAME] > 0).all() and trials[toy.NAME].notna().all()
    assert f">{toy.NAME}</td>" in report.write_report(out).read_text()


def test_a_metric_no_trial_produces_stops_the_job_at_its_start(tiny_model_dir, tmp_path,
                                                                 capsys):
    """A registered metric that neither the evaluator nor the feature statistics compute
    would fail only when the search's tables are written; the job refuses it up front."""
    from raysae import cli

    metrics.add_metric(metrics.Metric("sparsity_score", "a score nothing computes"))
    try:
        code = cli.main(["search", "--model", str(tiny_model_dir), "--hook", HOOK,
                         "--storage", str(tmp_path / "tune"), "--results",
                         str(tmp_path / "results")])
    finally:
        metrics.remove_metric("sparsity_score")
    assert code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("raysae search: error: metric(s) ['sparsity_score'] are registered")
    assert not (tmp_path / "tune").exists() and not (tmp_path / "results").exists()
