"""Paired-seed confidence intervals: coverage on synthetic results, frontier score, edge cases."""

import numpy as np
import pandas as pd
import pytest

from raysae.analysis.confidence import (
    COLUMNS,
    compare,
    paired_differences,
    per_seed_table,
)

SEED_SD = 0.03  # paired seed effect (label vs reference), as measured at L0 8
BLOCK_SD = 0.10  # block x penalty effect: the held-out text's own sampling noise
INTERACTION_SD = 0.10  # seed x block noise
N_BLOCKS = 64


def synthetic(rng, delta, n_seeds=3, targets=(8.0, 16.0), n_blocks=N_BLOCKS, seed_sd=SEED_SD,
              interaction_sd=INTERACTION_SD):
    """Trials of "L1" and "sqrt" with a known true difference ``delta`` (sqrt - L1).

    Per-block CE = block difficulty (shared by every SAE) + penalty effect + seed effect of
    each (seed, penalty) + block effect of each penalty (shared by all seeds: the blocks are
    the same) + seed x block noise. Returns (trials, conditional truth per (target, seed)):
    the difference for those trained SAEs on the population of blocks.
    """
    rows, truth = [], {}
    for target in targets:
        difficulty = 4.0 + rng.normal(0, 0.5, n_blocks)
        block_effect = {p: rng.normal(0, BLOCK_SD / np.sqrt(2), n_blocks) for p in ("L1", "sqrt")}
        for seed in range(n_seeds):
            shared = rng.normal(0, 0.04)  # same init and data order: cancels in the pair
            for family, effect in (("L1", 0.0), ("sqrt", delta)):
                seed_effect = shared + rng.normal(0, seed_sd / np.sqrt(2))
                blocks = (difficulty + effect + seed_effect + block_effect[family]
                          + rng.normal(0, interaction_sd / np.sqrt(2), n_blocks))
                rows.append({"family": family, "label": family, "seed": seed,
                             "target_l0": target, "ce_sae": float(blocks.mean()),
                             "status": "finished", "ce_sae_blocks": blocks.tolist(),
                             "_truth": effect + seed_effect})
            truth[(target, seed)] = rows[-1]["_truth"] - rows[-2]["_truth"]
    return pd.DataFrame(rows).drop(columns="_truth"), truth


def per_target(result):
    return result[result["target_l0"].notna()]


def test_intervals_cover_the_truth_about_95_percent():
    rng = np.random.default_rng(0)
    covered = []
    for _ in range(200):
        trials, _ = synthetic(rng, delta=-0.05)
        rows = per_target(compare(trials, references=["L1"]))
        assert set(rows["interval"]) == {"seeds+blocks"} and (rows["n_seeds"] == 3).all()
        covered += list((rows["ci_low"] <= -0.05) & (rows["ci_high"] >= -0.05))
    assert 0.9 <= np.mean(covered) <= 0.99


def test_a_clear_difference_is_detected():
    """sqrt - L1 at L0 16 on the default job: -0.062 nats, paired sd 0.007 over 3 seeds
    (seed effect 0.005 and seed x block noise 0.04 / sqrt(64) = 0.005 make up the 0.007)."""
    rng = np.random.default_rng(9)
    calls = [per_target(compare(synthetic(rng, -0.062, seed_sd=0.005, interaction_sd=0.04)[0],
                                ["L1"]))["significant"].all() for _ in range(20)]
    assert np.mean(calls) >= 0.9


def test_zero_difference_is_significant_about_5_percent():
    rng = np.random.default_rng(1)
    calls = []
    for _ in range(200):
        trials, _ = synthetic(rng, delta=0.0)
        calls += list(per_target(compare(trials, references=["L1"]))["significant"])
    assert 0.01 <= np.mean(calls) <= 0.1


def test_single_seed_interval_covers_the_held_out_noise():
    """R = 1: the interval is about these trained SAEs (block noise only) and still covers."""
    rng = np.random.default_rng(2)
    covered = []
    for _ in range(200):
        trials, truth = synthetic(rng, delta=-0.05, n_seeds=1)
        rows = per_target(compare(trials, references=["L1"]))
        assert set(rows["interval"]) == {"blocks"}
        want = np.array([truth[(t, 0)] for t in rows["target_l0"]])
        covered += list((rows["ci_low"] <= want) & (want <= rows["ci_high"]))
    assert 0.9 <= np.mean(covered) <= 0.99


def test_seed_only_interval_without_blocks_is_a_paired_t():
    rng = np.random.default_rng(3)
    trials, _ = synthetic(rng, delta=-0.05, targets=(8.0,))
    row = per_target(compare(trials.drop(columns="ce_sae_blocks"), references=["L1"])).iloc[0]
    d = paired_differences(trials, "L1")["delta_ce"].to_numpy()
    half = 4.302653 * d.std(ddof=1) / np.sqrt(3)  # t_{0.975, 2}
    assert row["interval"] == "seeds" and row["delta_ce_mean"] == pytest.approx(d.mean())
    assert row["ci_high"] - row["ci_low"] == pytest.approx(2 * half, rel=1e-5)
    one = trials[trials["seed"] == 0].drop(columns="ce_sae_blocks")
    row = compare(one, references=["L1"]).iloc[0]
    assert row["interval"] == "none" and np.isnan(row["ci_low"]) and not row["significant"]


def test_frontier_score_is_the_mean_over_targets():
    rng = np.random.default_rng(4)
    trials, _ = synthetic(rng, delta=-0.05, targets=(4.0, 8.0, 16.0))
    result = compare(trials)
    assert list(result.columns) == list(COLUMNS)
    by_l1 = result[(result["label"] == "sqrt") & (result["reference"] == "L1")]
    frontier = by_l1[by_l1["target_l0"].isna()].iloc[0]
    targets = per_target(by_l1)
    assert len(targets) == 3 and frontier["n_seeds"] == 3
    assert frontier["delta_ce_mean"] == pytest.approx(targets["delta_ce_mean"].mean())
    assert frontier["ci_low"] < frontier["delta_ce_mean"] < frontier["ci_high"]
    by_sqrt = result[(result["label"] == "L1") & (result["reference"] == "sqrt")]
    np.testing.assert_allclose(by_sqrt["delta_ce_mean"], -by_l1["delta_ce_mean"])
    assert set(result["family"]) == {"L1", "sqrt"}


def test_missing_seed_pairs_on_common_seeds_and_unfinished_rows_are_ignored():
    rng = np.random.default_rng(5)
    trials, _ = synthetic(rng, delta=-0.05, targets=(8.0, 16.0))
    drop = (trials["label"] == "sqrt") & (trials["seed"] == 2) & (trials["target_l0"] == 8.0)
    trials = trials[~drop]
    bad = trials[(trials["label"] == "sqrt") & (trials["seed"] == 1)].copy()
    bad["status"], bad["ce_sae"] = "diverged", 99.0
    trials.loc[bad.index, "status"] = "finished"  # keep the good rows, add failed duplicates
    trials = pd.concat([trials, bad], ignore_index=True)
    pairs = paired_differences(trials, "L1")
    assert sorted(pairs.loc[pairs["target_l0"] == 8.0, "seed"]) == [0, 1]
    assert (pairs["delta_ce"].abs() < 1).all()  # the diverged 99.0 rows never enter
    result = compare(trials, references=["L1"])
    n = result.set_index("target_l0", drop=False)["n_seeds"]
    assert n[8.0] == 2 and n[16.0] == 3
    frontier = result[result["target_l0"].isna()].iloc[0]
    assert frontier["n_seeds"] == 2  # seed 2 lacks target 8: not in the frontier score
    want = pairs[pairs["seed"] < 2]["delta_ce"].mean()
    assert frontier["delta_ce_mean"] == pytest.approx(want)


def test_no_reference_rows_gives_an_empty_frame_with_the_columns():
    rng = np.random.default_rng(6)
    trials, _ = synthetic(rng, delta=0.0, targets=(8.0,))
    only_sqrt = trials[trials["label"] == "sqrt"]
    result = compare(only_sqrt)
    assert result.empty and list(result.columns) == list(COLUMNS)
    failed = trials.assign(status="diverged")
    assert compare(failed).empty and paired_differences(failed).empty


def test_labels_within_a_family_are_compared_separately_and_family_names_a_reference():
    rng = np.random.default_rng(7)
    trials, _ = synthetic(rng, delta=-0.05, targets=(8.0,))
    sqrt = trials[trials["label"] == "sqrt"]
    power = pd.concat([sqrt.assign(family="power", label="power(p=0.5)"),
                       sqrt.assign(family="power", label="power(p=0.3)",
                                   ce_sae=sqrt["ce_sae"] + 0.01)])
    renamed = trials.assign(label=trials["label"].replace({"L1": "L1 (lam search)"}))
    result = compare(pd.concat([renamed, power]), references=["L1"])
    rows = per_target(result).set_index("label")
    assert rows.loc["power(p=0.3)", "delta_ce_mean"] == pytest.approx(
        rows.loc["power(p=0.5)", "delta_ce_mean"] + 0.01)
    assert set(rows["family"]) == {"power", "sqrt"} and set(rows["reference"]) == {"L1"}


def test_per_seed_table_has_one_ce_column_per_seed():
    rng = np.random.default_rng(8)
    trials, _ = synthetic(rng, delta=-0.05, targets=(8.0, 16.0))
    table = per_seed_table(trials)
    assert list(table.columns) == ["target_l0", "label", "family", "ce_seed_0", "ce_seed_1",
                                   "ce_seed_2"]
    assert len(table) == 4
    got = table.set_index(["target_l0", "label"]).loc[(16.0, "sqrt"), "ce_seed_1"]
    want = trials.query("target_l0 == 16 and label == 'sqrt' and seed == 1")["ce_sae"]
    assert got == pytest.approx(want.item())
