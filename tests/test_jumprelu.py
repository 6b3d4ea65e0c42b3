"""JumpReLU: its straight-through gradients are the kernel formulas, the first batch puts L0 at
the target, the calibration and lambda hold it there on a planted problem (inference L0 with
the saved thresholds within 10%), a trained member saves as a SAELens jumprelu SAE whose
formulas (written here) match raysae's, and a checkpoint resumes exactly."""

import json

import pytest
import torch
from planted import planted_batches
from safetensors.torch import load_file

from raysae.core.config import SAEConfig, TrainConfig
from raysae.core.jumprelu import JumpReLU, _JumpReLU, _Step
from raysae.core.kinds import get_kind
from raysae.core.ladder import LadderTrainer
from raysae.core.outcome import FINISHED
from raysae.core.sae import SAE
from raysae.core.training import train_ladder

D_IN, D_SAE, N_TRUE, K_ACTIVE = 16, 64, 32, 4
TARGETS = [2.0, 4.0, 8.0]
HELD_OUT = next(planted_batches(D_IN, N_TRUE, K_ACTIVE, 4096, seed=9))


def _cfg(**kw):
    base = dict(sae=SAEConfig(D_IN, D_SAE), kind="jumprelu", total_tokens=256 * 300,
                batch_size=256, lr=3e-3, log_every=50, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_registered_as_a_lambda_steered_baseline():
    kind = get_kind("jumprelu")
    assert isinstance(kind, JumpReLU) and kind.label == "JumpReLU"
    assert kind.uses_lambda and kind.uses_controller and not kind.uses_penalty
    assert kind.saelens_architecture == "jumprelu"


def test_straight_through_gradients_are_the_kernel_formulas():
    torch.manual_seed(0)
    pre = torch.randn(2, 50, 8, requires_grad=True)
    theta = torch.full((2, 1, 8), 0.3, requires_grad=True)
    bw = torch.full((2, 1, 1), 0.4)
    g = torch.randn(2, 50, 8)
    f = _JumpReLU.apply(pre, theta, bw)
    assert torch.equal(f, pre.relu() * (pre > theta))
    (f * g).sum().backward()
    kernel = (((pre - theta).abs() < 0.2).float() / 0.4).detach()
    torch.testing.assert_close(pre.grad, g * (pre > theta).float())
    torch.testing.assert_close(theta.grad, -(theta * kernel * g).sum(1, keepdim=True))
    theta.grad = None
    step = _Step.apply(pre.detach(), theta, bw)
    assert torch.equal(step, (pre > theta).float())
    (step * g).sum().backward()
    torch.testing.assert_close(theta.grad, -(kernel * g).sum(1, keepdim=True))


def test_first_batch_puts_each_member_at_its_target():
    trainer = LadderTrainer(_cfg(lr=1e-12), TARGETS)
    x = next(planted_batches(D_IN, N_TRUE, K_ACTIVE, 1024, seed=1))
    trainer.step(x)
    pre = trainer.model.pre_acts(trainer._prepare(x)[0])
    l0 = (pre > JumpReLU.theta(trainer.model.state)).float().sum(-1).mean(-1)
    torch.testing.assert_close(l0, torch.tensor(TARGETS), rtol=0.02, atol=0.0)


@pytest.fixture(scope="module")
def trained():
    cfg = _cfg()
    return train_ladder(cfg, TARGETS, planted_batches(D_IN, N_TRUE, K_ACTIVE, 256, 1, 300))


def test_trains_to_its_targets_with_the_saved_thresholds(trained):
    for target, res in zip(TARGETS, trained, strict=True):
        assert res.status == FINISHED
        sae = res.sae
        assert sae.architecture == "jumprelu" and torch.isfinite(sae.threshold).all()
        assert (sae.threshold > 0).all()
        l0 = (sae.encode(HELD_OUT) > 0).float().sum(dim=-1).mean().item()
        assert abs(l0 / target - 1) <= 0.10, (target, l0)  # planted: 256-token batches


def test_saved_member_is_a_saelens_jumprelu_sae(trained, tmp_path):
    """SAELens's JumpReLUSAE encode / decode, from the saved files alone (sae_lens is not
    installed here): hidden_pre = (x - b_dec) W_enc + b_enc, f = relu(hidden_pre) *
    (hidden_pre > threshold), x_hat = f W_dec + b_dec."""
    for k, res in enumerate(trained):
        path = res.sae.save(tmp_path / f"m{k}")
        cfg = json.loads((path / "cfg.json").read_text())
        assert cfg["architecture"] == "jumprelu" and cfg["apply_b_dec_to_input"] is True
        t = load_file(str(path / "sae_weights.safetensors"))
        assert set(t) == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
        assert t["threshold"].shape == (D_SAE,)
        pre = (HELD_OUT - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
        f_ref = torch.relu(pre) * (pre > t["threshold"]).to(pre.dtype)
        x_hat, f = SAE.load(path)(HELD_OUT)
        torch.testing.assert_close(f, f_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x_hat, f_ref @ t["W_dec"] + t["b_dec"], atol=1e-5,
                                   rtol=1e-5)


def test_checkpoint_resumes_exactly():
    cfg = _cfg(total_tokens=256 * 60, log_every=20)
    batches = list(planted_batches(D_IN, N_TRUE, K_ACTIVE, 256, 1, 60))
    full = LadderTrainer(cfg, TARGETS)
    half = LadderTrainer(cfg, TARGETS)
    for x in batches[:30]:
        full.step(x)
        half.step(x)
    resumed = LadderTrainer.from_bytes(half.to_bytes())
    for x in batches[30:]:
        full.step(x)
        resumed.step(x)
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert resumed.history == full.history
