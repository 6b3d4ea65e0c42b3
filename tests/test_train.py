"""One SAE (a ladder of one): recovers planted directions, diverges cleanly, resumes exactly."""

import math

import pytest
import torch

from raysae.core.config import PenaltyConfig, SAEConfig, TrainConfig
from raysae.core.ladder import LadderTrainer
from raysae.core.outcome import (
    DATA_EXHAUSTED,
    DIVERGED,
    FINISHED,
    CheckpointError,
    NonFiniteActivationsError,
)
from raysae.core.training import drive, ladder_of_one

D_IN, N_TRUE, K_ACTIVE = 32, 64, 3


def _dictionary(seed=0):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(N_TRUE, D_IN, generator=g)
    return d / d.norm(dim=1, keepdim=True)


def _sparse_batches(dictionary, batch_size=1024, seed=1):
    """x = sum of K_ACTIVE random true directions with magnitudes in [0.5, 1.5] + noise."""
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.rand(batch_size, N_TRUE, generator=g).argsort(dim=1)[:, :K_ACTIVE]
        mags = torch.rand(batch_size, K_ACTIVE, generator=g) + 0.5
        x = (mags.unsqueeze(-1) * dictionary[idx]).sum(dim=1)
        yield x + 0.01 * torch.randn(batch_size, D_IN, generator=g)


def _cfg(p, lam, **kw):
    base = dict(sae=SAEConfig(D_IN, 128), penalty=PenaltyConfig.power(p=p), lam=lam,
                total_tokens=1024 * 700, batch_size=1024, lr=3e-3, log_every=100)
    base.update(kw)
    return TrainConfig(**base)


def _train_one(cfg, batches, trainer=None):
    """One SAE trained to the end: the one member's result."""
    (result,) = drive(trainer or ladder_of_one(cfg), batches)
    return result


@pytest.mark.parametrize("p, lam", [(1.0, 3.0), (0.5, 3.0)])
def test_recovers_planted_directions(p, lam):
    torch.manual_seed(0)
    truth = _dictionary()
    result = _train_one(_cfg(p, lam), _sparse_batches(truth))
    assert result.status == FINISHED and result.steps == 700
    learned = result.sae.W_dec.detach()
    learned = learned / learned.norm(dim=1, keepdim=True)
    mmcs = (truth @ learned.T).max(dim=1).values.mean().item()
    assert mmcs >= 0.9, mmcs
    # L0 of the final SAE on fresh data, on raw activations (the scale is folded in).
    x = next(_sparse_batches(truth, 4096, seed=99))
    l0 = (result.sae.encode(x) > 0).float().sum(-1).mean().item()
    assert K_ACTIVE / 2 <= l0 <= 2 * K_ACTIVE, l0
    assert len(result.history) == 7 and result.history[-1]["tokens_seen"] == 1024 * 700


def test_normalization_scale_makes_mean_squared_norm_d_in():
    x = torch.randn(512, D_IN) * 10
    trainer = ladder_of_one(_cfg(1.0, 1.0, total_tokens=1024))
    trainer.step(x)
    assert trainer.scale == pytest.approx(math.sqrt(D_IN / x.pow(2).sum(-1).mean().item()))


def test_divergence_ends_with_status_not_exception():
    batches = iter([torch.randn(1024, D_IN) * 1e30] * 10)
    result = _train_one(_cfg(1.0, 1.0, normalize_activations=False), batches)
    assert result.status == DIVERGED and "step" in result.reason


def test_nan_activations_are_named_not_trained_on():
    x = torch.randn(1024, D_IN)
    x[5, 3] = float("nan")
    with pytest.raises(NonFiniteActivationsError, match="NaN/inf in 1 of 1024 rows"):
        _train_one(_cfg(1.0, 1.0), iter([x]))


def test_short_stream_is_reported_as_exhausted():
    result = _train_one(_cfg(1.0, 1.0), iter([torch.randn(1024, D_IN)] * 3))
    assert result.status == DATA_EXHAUSTED and result.steps == 3 and "ran out" in result.reason


def test_fixed_lambda_warms_up_then_stays():
    truth = _dictionary()
    cfg = _cfg(1.0, 2.0, lam_warmup_frac=0.1, total_tokens=1024 * 40, log_every=2)
    trainer = ladder_of_one(cfg)  # 4 warm-up steps
    assert trainer.current_lam().tolist() == pytest.approx([2.0 / 4])
    result = _train_one(cfg, _sparse_batches(truth), trainer=trainer)
    assert [row["lam"] for row in result.history[:3]] == pytest.approx([1.0, 2.0, 2.0])
    assert {row["lam"] for row in result.history[2:]} == {2.0} and result.lam == 2.0


def test_controller_reaches_target_l0_then_freezes():
    truth = _dictionary()
    cfg = _cfg(0.5, 0.01, l0_target=4.0, total_tokens=1024 * 400)  # controls 320 steps
    result = _train_one(cfg, _sparse_batches(truth))
    assert result.lam > 1.0  # started at 0.01: the controller did the work
    x = next(_sparse_batches(truth, 4096, seed=7))
    l0 = (result.sae.encode(x) > 0).float().sum(-1).mean().item()
    assert abs(l0 / 4.0 - 1) < 0.15, l0
    late = [row["lam"] for row in result.history if row["step"] > 320]
    assert len(set(late)) == 1 and late[0] == result.lam  # frozen after the control phase


def test_checkpoint_resume_reproduces_uninterrupted_run():
    truth = _dictionary()
    cfg = _cfg(0.5, 1.0, total_tokens=1024 * 40, log_every=10)
    batches = list(zip(range(40), _sparse_batches(truth)))
    full = _train_one(cfg, (b for _, b in batches))
    first = ladder_of_one(cfg)
    for _, b in batches[:25]:
        first.step(b)
    resumed = LadderTrainer.from_bytes(first.to_bytes())
    result = _train_one(cfg, (b for _, b in batches[25:]), trainer=resumed)
    assert result.steps == full.steps == 40
    assert torch.allclose(result.sae.W_dec, full.sae.W_dec, atol=1e-6)
    assert [r["step"] for r in result.history] == [r["step"] for r in full.history]


def test_unsafe_or_truncated_checkpoint_refused():
    import pickle

    cfg = _cfg(1.0, 1.0, total_tokens=1024 * 2)
    data = ladder_of_one(cfg).to_bytes()
    with pytest.raises(CheckpointError, match="unreadable or unsafe"):
        LadderTrainer.from_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        LadderTrainer.from_bytes(pickle.dumps(print))
