"""Matryoshka BatchTopK: one level is BatchTopK exactly, the prefix losses match a plain
member-by-member reference (dense and fixed-k decoders), a trained member saves as a SAELens
jumprelu SAE whose formulas (written here) match raysae's, and a short planted run trains
without NaN to its target L0 with the inference threshold."""

import json

import pytest
import torch
from planted import planted_batches
from safetensors.torch import load_file

from raysae.core.config import PenaltyConfig, SAEConfig, TrainConfig
from raysae.core.kinds import baseline_kinds, get_kind, kind_styles
from raysae.core.ladder import LadderTrainer
from raysae.core.ladder_sae import LadderSAE
from raysae.core.matryoshka import MatryoshkaBatchTopK, matryoshka_widths
from raysae.core.outcome import FINISHED
from raysae.core.sae import SAE
from raysae.core.topk import BatchTopK
from raysae.core.training import train_ladder
from raysae.settings import SettingError, flag_name

D_IN, D_SAE, N_TRUE, K_ACTIVE = 32, 128, 64, 6
TARGETS = [4.0, 8.0]
HELD_OUT = next(planted_batches(D_IN, N_TRUE, K_ACTIVE, 4096, seed=99))


def _planted(steps=None, seed=1):
    return planted_batches(D_IN, N_TRUE, K_ACTIVE, 256, seed, steps)


def _cfg(kind="matryoshka", **kw):
    base = dict(sae=SAEConfig(D_IN, D_SAE), penalty=PenaltyConfig.power(p=0.5), kind=kind,
                lam=0.3, total_tokens=256 * 300, batch_size=256, lr=3e-3, log_every=50, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_registered_with_default_widths_and_checks_them():
    kind = get_kind("matryoshka")
    assert isinstance(kind, MatryoshkaBatchTopK) and isinstance(kind, BatchTopK)
    assert (kind.label, kind.saelens_architecture, kind.uses_penalty) == (
        "Matryoshka", "jumprelu", False)
    assert kind.baseline and "matryoshka" in baseline_kinds()
    assert kind_styles()["Matryoshka"] != kind_styles()["BatchTopK"]
    fractions = kind.options().fractions
    assert matryoshka_widths(512, fractions) == [128, 256, 512]  # local: targets up to 128
    assert matryoshka_widths(2048, fractions) == [512, 1024, 2048]  # pythia-70m: up to 256
    assert LadderSAE(SAEConfig(D_IN, D_SAE), [0, 1], kind="matryoshka",
                     targets=TARGETS).state.widths == [32, 64, 128]
    with pytest.raises(ValueError, match="strictly increasing"):
        matryoshka_widths(128, (0.5, 0.5, 1.0))
    with pytest.raises(ValueError, match="end at d_sae"):
        matryoshka_widths(128, (0.25, 0.5))
    with pytest.raises(ValueError, match="smallest prefix"):
        LadderTrainer(_cfg(), [4.0, 40.0])  # 40 > 128 / 4
    with pytest.raises(SettingError) as bad:  # an option is a setting: named as its flag
        _cfg(kind_options={"matryoshka": {"fractions": (0.5, 0.25, 1.0)}})
    assert bad.value.render(flag_name).startswith("--matryoshka-fractions 0.5 0.25 1 is invalid")


@pytest.mark.parametrize("sparse_step", ["off", "on"])
def test_one_level_trains_exactly_as_batchtopk(sparse_step):
    cfg = dict(total_tokens=256 * 25, log_every=8, sparse_step=sparse_step)
    one = {"matryoshka": {"fractions": (1.0,)}}
    mat = LadderTrainer(_cfg(**cfg, kind_options=one), TARGETS)
    btk = LadderTrainer(_cfg("batchtopk", **cfg), TARGETS)
    assert mat.model.state.widths == [D_SAE]
    for x in _planted(steps=25):
        mat.step(x), btk.step(x)
    for name, p in btk.model.named_parameters():
        assert torch.equal(getattr(mat.model, name), p), name
    assert torch.equal(mat.model.state.threshold, btk.model.state.threshold)
    for ours, theirs in zip(mat.history, btk.history, strict=True):
        for row, ref in zip(ours, theirs, strict=True):
            assert row["loss"] == ref["loss"] and row["penalty_loss"] == ref["penalty_loss"]
            assert not [name for name in row if name.startswith("prefix_")]


def _reference_inner(model, x, f, widths):
    """Each member alone, each prefix from scratch: [K, L - 1]."""
    out = torch.zeros(model.k, len(widths) - 1)
    for k in range(model.k):
        for i, w in enumerate(widths[:-1]):
            x_hat = f[k][:, :w] @ model.W_dec[k][:w] + model.b_dec[k]
            out[k, i] = (x - x_hat).pow(2).sum(dim=-1).mean()
    return out


def test_inner_losses_match_a_member_by_member_reference():
    kind = get_kind("matryoshka")
    model = LadderSAE(SAEConfig(D_IN, D_SAE), [0, 1, 2], kind="matryoshka",
                       targets=[2.0, 4.0, 8.0])
    with torch.no_grad():
        model.b_dec.normal_(0, 0.1), model.b_enc.normal_(0, 0.1)
    x = next(_planted())
    with torch.no_grad():
        f = kind.activate(model, model.pre_acts(x))
        ref_f = get_kind("batchtopk").activate(model, model.pre_acts(x))
        assert torch.equal(f, ref_f)  # the selection is BatchTopK's, one per member
        dense = torch.stack(list(kind.inner_losses(model, x, f).values()), dim=1)
        fixed = torch.stack(list(kind.inner_losses(
            model, x, kind.activate_fixed(model, model.pre_acts(x))).values()), dim=1)
    assert list(kind.inner_losses(model, x, f)) == ["prefix_w32", "prefix_w64"]
    ref = _reference_inner(model, x, f, [32, 64, 128])
    assert dense.shape == (3, 2)
    torch.testing.assert_close(dense, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(fixed, ref, atol=1e-4, rtol=1e-5)
    assert (ref[:, 0] >= ref[:, 1]).all()  # a wider prefix reconstructs at least as well


def test_loss_term_is_auxk_plus_the_summed_prefix_losses_and_trains_the_prefixes():
    trainer = LadderTrainer(_cfg(total_tokens=256 * 10), TARGETS)
    x = next(_planted())
    trainer.step(x)  # sets the activation scale
    trainer.opt.zero_grad(set_to_none=True)
    x = x * trainer.scale
    model, kind = trainer.model, trainer.kind
    pre = model.pre_acts(x)
    f = kind.activate(model, pre)
    x_hat = model.decode(f)
    terms, logged = kind.loss_terms(trainer.context(), x, x_hat, f, pre)
    term = sum(terms.values())
    aux = kind.auxk(trainer.context(), x, x_hat, pre)
    inner = _reference_inner(model, x, f.detach(), model.state.widths)
    torch.testing.assert_close(logged, aux)
    torch.testing.assert_close(terms["auxk"], aux)
    torch.testing.assert_close(term.detach(), aux.detach() + inner.sum(dim=1), atol=1e-4,
                               rtol=1e-5)
    term.sum().backward()  # the prefix losses reach the encoder (through f) and the decoder
    assert model.W_enc.grad.abs().sum() > 0
    assert model.W_dec.grad[:, : model.state.widths[0]].abs().sum() > 0


@pytest.fixture(scope="module")
def trained():
    return train_ladder(_cfg(), TARGETS, _planted())


def test_planted_run_trains_without_nan_to_its_target_l0(trained):
    for target, res in zip(TARGETS, trained, strict=True):
        assert res.status == FINISHED
        rows = res.history
        assert all(torch.isfinite(torch.tensor([r["loss"], r["prefix_w32_loss"]])).all()
                   for r in rows)
        last = rows[-1]
        assert last["prefix_w32_loss"] >= last["prefix_w64_loss"] >= last["recon_loss"]
        assert last["loss"] == pytest.approx(last["recon_loss"] + last["auxk_loss"]
                                             + last["prefix_w32_loss"] + last["prefix_w64_loss"],
                                             rel=1e-5)
        sae = res.sae
        assert sae.architecture == "jumprelu" and (sae.threshold == sae.threshold[0]).all()
        assert sae.threshold[0].item() == pytest.approx(last["threshold"], rel=1e-6)
        l0 = (sae.encode(HELD_OUT) > 0).float().sum(dim=-1).mean().item()
        assert abs(l0 / target - 1) <= 0.10, (target, l0)


def _saelens_jumprelu(path, x):
    """SAELens's JumpReLUSAE.encode / decode from the saved files alone (sae_lens is not
    installed): sae_in = x - b_dec (apply_b_dec_to_input), hidden_pre = sae_in W_enc + b_enc,
    f = relu(hidden_pre) * (hidden_pre > threshold), x_hat = f W_dec + b_dec."""
    cfg = json.loads((path / "cfg.json").read_text())
    t = load_file(str(path / "sae_weights.safetensors"))
    sae_in = x - t["b_dec"] * cfg["apply_b_dec_to_input"]
    hidden_pre = sae_in @ t["W_enc"] + t["b_enc"]
    f = torch.relu(hidden_pre) * (hidden_pre > t["threshold"]).to(hidden_pre.dtype)
    return f, f @ t["W_dec"] + t["b_dec"]


def test_saved_member_is_a_saelens_jumprelu_sae(trained, tmp_path):
    for k, res in enumerate(trained):
        path = res.sae.save(tmp_path / f"m{k}")
        cfg = json.loads((path / "cfg.json").read_text())
        assert cfg["architecture"] == "jumprelu"
        assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D_IN, D_SAE, "float32")
        assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
        tensors = load_file(str(path / "sae_weights.safetensors"))
        assert {n: tuple(t.shape) for n, t in tensors.items()} == {
            "W_enc": (D_IN, D_SAE), "W_dec": (D_SAE, D_IN), "b_enc": (D_SAE,),
            "b_dec": (D_IN,), "threshold": (D_SAE,)}
        theta = tensors["threshold"]
        assert (theta == theta[0]).all() and theta[0] > 0
        loaded = SAE.load(path)
        x_hat, f = loaded(HELD_OUT)
        f_ref, x_hat_ref = _saelens_jumprelu(path, HELD_OUT)
        torch.testing.assert_close(f, f_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x_hat, x_hat_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(f, res.sae.encode(HELD_OUT))
