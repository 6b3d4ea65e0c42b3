"""The whole search through the CLI with a confirmation and a budget check (issue #27): the
proposals' comparisons count only the confirmation's fresh seeds, every comparison exists on
both bases (target and matched L0), and --budget-check 2 retrains the references and the
best proposal with twice the tokens, paired seeds, fresh rows, and the report says which
claims keep their sign and significance."""

import pandas as pd
import pytest

from raysae import cli
from raysae.analysis import claims

HOOK = "blocks.0.hook_resid_post"
TOTAL = 2048

pytestmark = pytest.mark.slow  # about 100 s: 26 trials in four stages


def test_search_with_confirmation_and_budget_check(tiny_model_dir, tmp_path, capsys):
    results = tmp_path / "results"
    code = cli.main(["search", "--model", str(tiny_model_dir), "--hook", HOOK,
                     "--context-length", "32", "--targets", "4", "8", "--num-trials", "2",
                     "--seeds", "2", "--confirm-best", "1", "--baselines", "topk",
                     "--total-tokens", str(TOTAL), "--cache-tokens", str(TOTAL),
                     "--batch-size", "256", "--budget-check", "2", "--eval-blocks", "4",
                     "--feature-tokens", "1024", "--storage", str(tmp_path / "tune"),
                     "--results", str(results)])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert f"the cache holds {2 * TOTAL} rows" in out
    trials = pd.read_parquet(results / "trials.parquet")
    assert set(trials["stage"]) == {"refs", "search", "confirm", "budget"}
    longer = trials[trials["stage"] == "budget"]
    assert (longer["budget"] == 2.0).all() and (trials.loc[longer.index.difference(
        longer.index), "budget"] == 1.0).all()
    assert (longer["tokens_seen"] == 2 * TOTAL).all()
    assert (trials.loc[trials["stage"] != "budget", "tokens_seen"] == TOTAL).all()
    proposals = set(trials.loc[trials["stage"] == "search", "label"])
    confirmed = set(trials.loc[trials["stage"] == "confirm", "label"]) & proposals
    assert len(confirmed) == 1
    assert set(longer["label"]) == {"L1", "sqrt", "sqrt(sqrt)", "TopK"} | confirmed
    assert set(longer["seed"]) == {0, 1}

    comp = pd.read_parquet(results / "comparisons.parquet")
    assert set(comp["budget"]) == {1.0, 2.0}
    # matched-L0 rows need ladders that span the reference's L0 (tests/test_confidence.py);
    # this short run's penalty SAEs sit at the same L0 on both rungs
    assert "target" in set(comp["basis"])
    best = next(iter(confirmed))
    mine = comp[(comp["label"] == best) & (comp["budget"] == 1.0) & (comp["basis"] == "target")]
    assert len(mine) and (mine["n_seeds"] == 1).all()  # seed 1: the seed-0 run chose it
    assert mine["fresh_seeds_only"].all()
    unconfirmed = comp[comp["label"].isin(proposals - confirmed)]
    assert len(unconfirmed) and not unconfirmed["fresh_seeds_only"].any()
    at_2x = comp[(comp["label"] == best) & (comp["budget"] == 2.0) & (comp["basis"] == "target")]
    assert len(at_2x) and (at_2x["n_seeds"] == 2).all()  # nothing chose the 2x replicates

    table = claims.budget_table(comp)
    assert len(table) and set(table["budget"]) == {"2x"}
    assert {best, "sqrt"} <= set(table["label"])
    page = (results / "report.html").read_text()
    assert "Budget check" in page and "basis" in page
