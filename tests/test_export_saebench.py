"""`raysae export RESULTS --format saebench` on a real (tiny) search: one SAEBench core JSON
per saved SAE, SAEBench's metric names only, the values of trials.parquet, a loadable
SAELens folder beside each, and one-line exit-2 errors that leave nothing behind."""

import json

import pandas as pd
import pytest

from raysae.analysis import export_saebench
from raysae.cli import main
from raysae.core.sae import SAE

HOOK = "blocks.0.hook_resid_post"

# SAEBench's core metric names, copied from adamkarvonen/SAEBench
# sae_bench/evals/core/eval_output.py (commit 8042bb3828c6340da8d12062324e92b2077c571c):
# category -> the fields of its *Metrics dataclass.
SAEBENCH_CORE = {
    "model_behavior_preservation": {"kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"},
    "model_performance_preservation": {"ce_loss_score", "ce_loss_with_ablation",
                                       "ce_loss_with_sae", "ce_loss_without_sae"},
    "reconstruction_quality": {"explained_variance", "explained_variance_legacy", "mse",
                               "cossim"},
    "shrinkage": {"l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"},
    "sparsity": {"l0", "l1"},
    "token_stats": {"total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"},
    "misc_metrics": {"freq_over_1_percent", "freq_over_10_percent",
                     "normalized_freq_over_1_percent", "normalized_freq_over_10_percent",
                     "average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim",
                     "frac_alive"},
}
# sae_bench/evals/base_eval_output.py + core/eval_output.py: CoreEvalOutput's fields.
SAEBENCH_TOP = {"eval_type_id", "eval_config", "eval_id", "datetime_epoch_millis",
                "eval_result_metrics", "eval_result_details", "sae_bench_commit_hash",
                "sae_lens_id", "sae_lens_release_id", "sae_lens_version", "sae_cfg_dict",
                "eval_result_unstructured"}


@pytest.fixture(scope="module")
def results(tiny_model_dir, ray_local, tmp_path_factory):
    """A real search through raysae's own code: one control-mode trial streaming the tiny
    model's activations live (no cache build: seconds), two ladder members (two SAEs)."""
    import dataclasses

    from search_helpers import make_plan, make_spec

    from raysae.activations.source import ActivationSource
    from raysae.search.stages import run_search

    tmp = tmp_path_factory.mktemp("export")
    source = ActivationSource(model=str(tiny_model_dir), hook=HOOK, context_length=32,
                              n_tokens=4096)
    spec = make_spec(activations=dataclasses.asdict(source), model=str(tiny_model_dir),
                     hook=HOOK, d_in=32, d_sae=64, context_length=32, total_tokens=4096,
                     batch_size=256, lambda_mode="control", targets=(4.0, 8.0), eval_blocks=4,
                     feature_tokens=512)
    plan = make_plan("exp", str(tmp / "tune"), spec, grid=({"p": 1.0},), targets=(4.0, 8.0))
    return run_search(plan, tmp / "results")


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_export_writes_saebench_json_and_saelens_folder_per_sae(results, capsys):
    trials = pd.read_parquet(results / "trials.parquet")
    finished = trials[trials["status"] == "finished"]
    assert len(finished) == 2

    code, out, err = _run(["export", str(results)], capsys)
    assert code == 0, err
    dest = results / "export" / "saebench"
    assert out.strip().count("\n") == 0 and "exported 2 SAEs" in out and str(dest) in out

    jsons = sorted(dest.glob("*.json"))
    assert len(jsons) == len(finished)
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        [p.name for p in jsons] + [p.stem for p in jsons])
    names = {p.stem for p in jsons}
    for _, row in finished.iterrows():
        name = f"{row['trial_id']}_L0-{row['target_l0']:g}"
        assert name in names
        record = json.loads((dest / f"{name}.json").read_text())
        assert set(record) <= SAEBENCH_TOP and record["eval_type_id"] == "core"
        assert record["sae_bench_commit_hash"] is None

        metrics = record["eval_result_metrics"]
        for category, values in metrics.items():
            assert set(values) <= SAEBENCH_CORE[category], category
            assert values, category  # empty categories are dropped, not written
        perf = metrics["model_performance_preservation"]
        assert perf["ce_loss_score"] == pytest.approx(row["ce_recovered"])
        assert perf["ce_loss_score"] == pytest.approx(
            (row["ce_zero"] - row["ce_sae"]) / (row["ce_zero"] - row["ce_clean"]))
        assert perf["ce_loss_with_sae"] == pytest.approx(row["ce_sae"])
        assert perf["ce_loss_without_sae"] == pytest.approx(row["ce_clean"])
        assert perf["ce_loss_with_ablation"] == pytest.approx(row["ce_zero"])
        assert metrics["sparsity"]["l0"] == pytest.approx(row["l0"])
        quality = metrics["reconstruction_quality"]
        assert quality["explained_variance"] == pytest.approx(1 - row["fvu"])
        assert quality["cossim"] == pytest.approx(row["cos_sim"])
        assert "mse" not in quality  # a different quantity in SAEBench: left out
        assert metrics["shrinkage"] == {"l2_ratio": pytest.approx(row["l2_ratio"])}
        assert metrics["misc_metrics"]["frac_alive"] == pytest.approx(1 - row["dead_fraction"])
        assert "model_behavior_preservation" not in metrics  # no KL in raysae: left out
        assert record["eval_result_unstructured"]["raysae"]["trial_id"] == row["trial_id"]

        sae = SAE.load(dest / name)
        assert (sae.cfg.d_in, sae.cfg.d_sae) == (32, 64)
        assert record["sae_cfg_dict"] == json.loads((dest / name / "cfg.json").read_text())
        assert record["sae_cfg_dict"]["raysae"]["target_l0"] == row["target_l0"]

    # Exporting again replaces the earlier export, leaving no temp folder beside it.
    assert _run(["export", str(results)], capsys)[0] == 0
    assert sorted(p.name for p in dest.parent.iterdir()) == ["saebench"]


def test_a_failed_export_leaves_nothing(results, tmp_path, monkeypatch):
    def boom(tmp, sources, records):
        (tmp / "half.json").write_text("{")
        raise OSError("disk full")

    monkeypatch.setattr(export_saebench, "_fill", boom)
    out = tmp_path / "deep" / "saebench"
    with pytest.raises(OSError, match="disk full"):
        export_saebench.export_results(results, out)
    assert not (tmp_path / "deep").exists()


@pytest.mark.parametrize("case", ["missing", "not_results", "unknown_format", "out_is_results"])
def test_bad_input_exits_2_with_one_line_and_no_output(case, results, tmp_path, capsys):
    target = {"missing": tmp_path / "nope", "not_results": tmp_path,
              "unknown_format": results, "out_is_results": results}[case]
    extra = {"unknown_format": ["--format", "csv"],
             "out_is_results": ["--out", str(results)]}.get(case, [])
    before = sorted(p.name for p in tmp_path.iterdir())
    existed = (results / "export").exists()

    code, out, err = _run(["export", str(target), *extra], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("raysae export: error: ")
    hint = {"missing": "no such folder", "not_results": "trials.parquet not found",
            "unknown_format": "invalid choice: 'csv'", "out_is_results": "results folder"}
    assert hint[case] in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (results / "export").exists() == existed
    assert not (tmp_path / "nope").exists()


def test_unknown_format_is_refused_by_the_module_too(results):
    with pytest.raises(ValueError, match="unknown export format 'csv'; pass one of"):
        export_saebench.export_results(results, fmt="csv")
