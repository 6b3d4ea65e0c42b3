"""The Gated SAE kind (raysae/core/gated.py): SAELens's gated architecture (encode from the
saved files alone, the decoder-norm fold, the save/load round trip), the training terms
(the gate trained only by the L1 term and the auxiliary reconstruction through a detached
decoder), members independent in a ladder, and a planted run that reaches its targets."""

import json

import pytest
import torch
from planted import planted_batches
from safetensors.torch import load_file

from raysae.core.config import SAEConfig, TrainConfig
from raysae.core.kinds import baseline_kinds, default_baselines, get_kind
from raysae.core.ladder import LadderTrainer
from raysae.core.outcome import FINISHED
from raysae.core.sae import SAE
from raysae.core.training import train_ladder

D_IN, D_SAE, TARGETS = 32, 128, [2.0, 4.0, 8.0]


def _cfg(**kw):
    base = dict(sae=SAEConfig(D_IN, D_SAE), kind="gated", lam=1.0, total_tokens=256 * 900,
                batch_size=256, lr=3e-3, log_every=100, seed=1)
    return TrainConfig(**{**base, **kw})


def _random_gated(seed=0) -> SAE:
    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5,
         "W_dec": torch.randn(D_SAE, D_IN, generator=g),
         "b_gate": torch.randn(D_SAE, generator=g) * 0.1,
         "r_mag": torch.randn(D_SAE, generator=g) * 0.3,
         "b_mag": torch.randn(D_SAE, generator=g) * 0.1,
         "b_dec": torch.randn(D_IN, generator=g) * 0.1}
    return SAE(SAEConfig(D_IN, D_SAE), "gated", **t)


def test_a_baseline_one_flag_away():
    kind = get_kind("gated")
    assert (kind.label, kind.saelens_architecture, kind.uses_lambda, kind.uses_controller) == (
        "Gated", "gated", True, True)
    assert "gated" in baseline_kinds() and "gated" not in default_baselines()
    assert kind.options().aux_coef == 1.0


def test_encode_is_saelens_formula_and_survives_save_load_and_fold(tmp_path):
    sae, x = _random_gated(), torch.randn(64, D_IN)
    path = sae.save(tmp_path / "g")
    cfg = json.loads((path / "cfg.json").read_text())
    t = load_file(str(path / "sae_weights.safetensors"))
    assert cfg["architecture"] == "gated" and "b_enc" not in t
    assert set(t) == {"W_enc", "W_dec", "b_gate", "r_mag", "b_mag", "b_dec"}
    centred = x - t["b_dec"]  # SAELens's GatedSAE.encode, written out
    gate = (centred @ t["W_enc"] + t["b_gate"] > 0).float()
    magnitude = torch.relu(centred @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
    f_ref = gate * magnitude
    loaded = SAE.load(path)
    torch.testing.assert_close(loaded.encode(x), f_ref)
    torch.testing.assert_close(loaded.decode(f_ref), f_ref @ t["W_dec"] + t["b_dec"])
    x_hat = sae(x)[0].detach()
    with torch.no_grad():
        sae.fold_decoder_norms_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    torch.testing.assert_close(sae(x)[0].detach(), x_hat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((sae.encode(x) > 0), (f_ref > 0))  # same features fire


def test_the_gate_is_trained_by_the_l1_term_and_the_auxiliary_reconstruction_only():
    trainer = LadderTrainer(_cfg(), TARGETS)
    x = next(planted_batches(D_IN, 64, 6, 256, seed=1))
    trainer.step(x)
    x = trainer._prepare(x)[0]
    model, kind, ctx = trainer.model, trainer.kind, trainer.context()
    pre = model.pre_acts(x)
    f = kind.activate(model, pre)
    x_hat = model.decode(f)
    terms, penalty = kind.loss_terms(ctx, x, x_hat, f, pre)
    assert set(terms) == {"gate_l1", "aux_recon"}
    torch.testing.assert_close(penalty, pre.relu().sum(-1).mean(-1), rtol=1e-4, atol=1e-5)
    model.zero_grad()
    (x_hat - x).pow(2).sum(-1).mean(-1).sum().backward(retain_graph=True)
    assert model.b_enc.grad.abs().sum() == 0  # the gate's step has no gradient
    assert model.state.r_mag.grad.abs().sum() > 0 and model.state.b_mag.grad.abs().sum() > 0
    model.zero_grad()
    terms["aux_recon"].sum().backward()
    assert model.W_dec.grad is None or model.W_dec.grad.abs().sum() == 0  # detached decoder
    assert model.b_enc.grad.abs().sum() > 0


def test_members_of_a_ladder_train_as_they_would_alone():
    cfg = _cfg(total_tokens=256 * 20, log_every=7)
    ens, singles = LadderTrainer(cfg, TARGETS), [LadderTrainer(cfg, [t]) for t in TARGETS]
    for x in planted_batches(D_IN, 64, 6, 256, seed=1, steps=20):
        ens.step(x)
        for one in singles:
            one.step(x)
    for k, one in enumerate(singles):
        for name, p in one.model.named_parameters():
            torch.testing.assert_close(ens.model.get_parameter(name)[k], p[0], atol=1e-5,
                                       rtol=1e-5, msg=name)
        assert ens.lam[k].item() == pytest.approx(one.lam[0].item(), rel=1e-6)


def test_a_planted_ladder_reaches_its_targets_on_held_out_tokens():
    held = next(planted_batches(D_IN, 64, 6, 4096, seed=99))
    for target, res in zip(TARGETS, train_ladder(_cfg(), TARGETS, planted_batches(
            D_IN, 64, 6, 256, seed=1)), strict=True):
        assert res.status == FINISHED and res.sae.architecture == "gated"
        l0 = (res.sae.encode(held) > 0).float().sum(-1).mean().item()
        assert abs(l0 / target - 1) <= 0.15, (target, l0)
        assert res.history[-1]["lam"] > 0
