"""Metric definitions against values computed by hand."""

import math

import pytest
import torch

from raysae.core import metrics


def test_l0_counts_positive_entries_per_token():
    f = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.5]])
    assert metrics.l0(f) == pytest.approx(1.5)


def test_mse_fvu_cos_l2_by_hand():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    x_hat = torch.tensor([[3.0, 0.0], [2.0, 0.0]])
    # errors: (0, 4) and (1, 0) -> squared sum 17 over 4 entries
    assert metrics.mse(x, x_hat) == pytest.approx(17 / 4)
    # mean x = (2, 2); deviations (1, 2), (-1, -2) -> total 10
    assert metrics.fvu(x, x_hat) == pytest.approx(17 / 10)
    # cos: (3*3)/(5*3) = 0.6 and 1.0
    assert metrics.cos_sim(x, x_hat) == pytest.approx(0.8)
    # norms: |x| = 5, 1; |x_hat| = 3, 2
    assert metrics.l2_ratio(x, x_hat) == pytest.approx((3 / 5 + 2 / 1) / 2)
    row = metrics.reconstruction_metrics(x, x_hat, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert row["l0"] == pytest.approx(0.5) and set(row) == {"l0", "mse", "fvu", "cos_sim",
                                                            "l2_ratio"}


def test_frequency_dead_low_frequency_and_median():
    f = torch.zeros(200_000, 3)
    f[:100_000, 0] = 1.0  # frequency 0.5
    f[0, 1] = 3.0  # frequency 5e-6 -> low frequency
    freq = metrics.feature_frequency(f)
    assert freq.tolist() == pytest.approx([0.5, 5e-6, 0.0])
    assert metrics.dead_count(freq) == 1
    assert metrics.low_frequency_count(freq) == 1
    assert metrics.median_nonzero(torch.tensor([[0.0, 0.2, 0.4], [0.9, 0.0, 0.0]])) == \
        pytest.approx(0.4)
    assert math.isnan(metrics.median_nonzero(torch.zeros(2, 2)))


def test_firing_counter_matches_one_shot_frequency():
    f = torch.relu(torch.randn(1000, 5))
    counter = metrics.FiringCounter(5)
    for chunk in f.split(300):
        counter.update(chunk)
    assert counter.tokens == 1000
    assert torch.allclose(counter.frequency(), metrics.feature_frequency(f))
