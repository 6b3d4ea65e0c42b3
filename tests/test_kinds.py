"""SAE kinds: TopK/BatchTopK hit their L0 on held-out tokens, saved kinds match the formulas
(written here in plain torch), a K-member ladder equals K single ones, p-annealing."""

import dataclasses
import json

import pytest
import torch
from planted import planted_batches
from safetensors.torch import load_file

from raysae.core.config import PenaltyConfig, SAEConfig, TrainConfig
from raysae.core.kinds import KINDS, PAnneal, get_kind
from raysae.core.ladder import LadderTrainer
from raysae.core.outcome import FINISHED
from raysae.core.sae import SAE
from raysae.core.training import train_ladder

D_IN, D_SAE, N_TRUE, K_ACTIVE = 32, 128, 64, 6
TARGETS = [4.0, 8.0]


def _planted(batch_size=256, seed=1, steps=None):
    return planted_batches(D_IN, N_TRUE, K_ACTIVE, batch_size, seed, steps)


def _cfg(kind, **kw):
    base = dict(sae=SAEConfig(D_IN, D_SAE), penalty=PenaltyConfig.power(p=0.5), kind=kind,
                lam=0.3, total_tokens=256 * 300, batch_size=256, lr=3e-3, log_every=50, seed=3)
    base.update(kw)
    return TrainConfig(**base)


HELD_OUT = next(_planted(batch_size=4096, seed=99))


@pytest.fixture(scope="module")
def trained():
    """kind -> per-member TrainResults of a 300-step ladder (trained once per kind)."""
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = train_ladder(_cfg(kind), TARGETS, _planted())
        return cache[kind]

    return get


def test_registry_declares_every_kind():
    assert set(KINDS) == {"relu", "topk", "batchtopk", "panneal", "jumprelu", "matryoshka",
                          "gated"}
    expect = {"topk": ("TopK", "topk", False), "batchtopk": ("BatchTopK", "jumprelu", False),
              "matryoshka": ("Matryoshka", "jumprelu", False),
              "panneal": ("p-anneal", "standard", True), "relu": ("ReLU", "standard", True)}
    for name, (label, arch, pen) in expect.items():
        kind = get_kind(name)
        assert (kind.label, kind.saelens_architecture, kind.uses_penalty) == (label, arch, pen)
        assert kind.uses_controller == pen
    assert get_kind("relu").family(_cfg("relu")) == "sqrt"
    assert get_kind("topk").family(_cfg("topk")) == "TopK"
    with pytest.raises(ValueError, match="kind"):
        _cfg("nope")
    with pytest.raises(ValueError, match="power penalty"):
        _cfg("panneal", penalty=PenaltyConfig("tanh", {"c": 1.0}))


def test_topk_l0_is_exactly_k_on_held_out_tokens(trained):
    for target, res in zip([4, 8], trained("topk"), strict=True):
        assert res.status == FINISHED and res.sae.architecture == "topk"
        counts = (res.sae.encode(HELD_OUT) > 0).sum(dim=-1)
        assert (counts == target).all(), counts.unique()
        assert res.lam == 0.0 and res.history[-1]["l0"] == target


def test_batchtopk_inference_l0_within_5_percent(trained):
    for target, res in zip(TARGETS, trained("batchtopk"), strict=True):
        sae = res.sae
        assert sae.architecture == "jumprelu" and (sae.threshold == sae.threshold[0]).all()
        assert sae.threshold[0] > 0
        assert sae.threshold[0].item() == pytest.approx(res.history[-1]["threshold"], rel=1e-6)
        l0 = (sae.encode(HELD_OUT) > 0).float().sum(dim=-1).mean().item()
        assert abs(l0 / target - 1) <= 0.05, (target, l0)


def _formula(path, x):
    """Encode/decode from the saved files alone (SAELens's formulas, plain torch)."""
    cfg = json.loads((path / "cfg.json").read_text())
    t = load_file(str(path / "sae_weights.safetensors"))
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    if cfg["architecture"] == "standard":
        f = pre.clamp_min(0)
    elif cfg["architecture"] == "topk":
        kth = pre.sort(dim=-1, descending=True).values[:, cfg["k"] - 1 : cfg["k"]]
        f = torch.where(pre >= kth, pre.clamp_min(0), 0.0)
    else:
        f = torch.where(pre > t["threshold"], pre.clamp_min(0), 0.0)
    return f, f @ t["W_dec"] + t["b_dec"]


@pytest.mark.parametrize("kind", ["relu", "topk", "batchtopk", "panneal"])
def test_saved_kind_loads_and_matches_the_formulas(kind, tmp_path):
    results = train_ladder(_cfg(kind, total_tokens=256 * 40), TARGETS, _planted())
    for k, res in enumerate(results):
        path = res.sae.save(tmp_path / f"m{k}")
        cfg = json.loads((path / "cfg.json").read_text())
        assert cfg["architecture"] == get_kind(kind).saelens_architecture
        if kind == "topk":
            assert cfg["k"] == int(TARGETS[k])
        if kind == "batchtopk":
            theta = load_file(str(path / "sae_weights.safetensors"))["threshold"]
            assert theta.shape == (D_SAE,) and (theta == theta[0]).all() and theta[0] > 0
        loaded = SAE.load(path)
        x_hat, f = loaded(HELD_OUT)
        f_ref, x_hat_ref = _formula(path, HELD_OUT)
        torch.testing.assert_close(f, f_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x_hat, x_hat_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded.encode(HELD_OUT), res.sae.encode(HELD_OUT))


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "panneal"])
def test_k_members_equal_k_single_member_ladders(kind):
    targets = [2.0, 4.0, 8.0]
    cfg = _cfg(kind, total_tokens=256 * 20, lr_decay_frac=0.5, log_every=7)
    ens = LadderTrainer(cfg, targets)
    singles = [LadderTrainer(cfg, [t]) for t in targets]
    for x in _planted(steps=20):
        ens.step(x)
        for one in singles:
            one.step(x)
    for k, one in enumerate(singles):
        for name, p in one.model.named_parameters():
            torch.testing.assert_close(getattr(ens.model, name)[k], p[0], atol=1e-5, rtol=1e-5)
        assert ens.lam[k].item() == pytest.approx(one.lam[0].item(), rel=1e-6)
        if kind == "batchtopk":
            assert ens.model.state.threshold[k].item() == pytest.approx(
                one.model.state.threshold[0].item(), rel=1e-5)
        assert ens.history[k][-1]["l0"] == pytest.approx(one.history[0][-1]["l0"], abs=0.05)


@pytest.mark.parametrize("kind", ["relu", "panneal", "topk", "jumprelu"])
def test_kind_hooks_see_a_step_context_never_the_trainer(kind, monkeypatch):
    """Every training hook of a kind gets a StepContext (typed: config, model, step,
    targets, lambdas), whose step and lambda are the trainer's at that call."""
    from raysae.core.kinds import StepContext

    cfg = _cfg(kind, total_tokens=256 * 6, log_every=3)
    trainer, seen = LadderTrainer(cfg, [2.0, 4.0]), []
    impl = get_kind(kind)
    for hook in ("loss_terms", "lambda_error", "log_fields"):
        original = getattr(impl, hook)

        def spy(ctx, *args, _hook=hook, _original=original):
            assert isinstance(ctx, StepContext), (_hook, type(ctx))
            seen.append((_hook, ctx.step, trainer.step_count))
            torch.testing.assert_close(ctx.lam, trainer.current_lam(ctx.step))
            assert ctx.k == 2 and ctx.model is trainer.model
            return _original(ctx, *args)

        monkeypatch.setattr(impl, hook, spy)
    for x in _planted(steps=6):
        trainer.step(x)
    hooks = {h for h, _, _ in seen}
    assert {"loss_terms", "log_fields"} <= hooks
    # loss terms see the step being taken; log fields the step just taken
    assert all(step == count for h, step, count in seen if h == "loss_terms")
    assert all(step == count - 1 for h, step, count in seen if h == "log_fields")


def test_batchtopk_checkpoint_keeps_the_threshold():
    cfg, batches = _cfg("batchtopk", total_tokens=256 * 30), list(_planted(steps=30))
    full, first = LadderTrainer(cfg, TARGETS), LadderTrainer(cfg, TARGETS)
    for x in batches:
        full.step(x)
    for x in batches[:13]:
        first.step(x)
    resumed = LadderTrainer.from_bytes(first.to_bytes())
    assert torch.equal(resumed.model.state.threshold, first.model.state.threshold)
    for x in batches[13:]:
        resumed.step(x)
    assert torch.equal(full.model.state.threshold, resumed.model.state.threshold)
    assert torch.equal(full.model.W_enc, resumed.model.W_enc)
    relu = dataclasses.replace(cfg, kind="relu")
    with pytest.raises(ValueError, match="kind"):
        LadderTrainer.from_bytes(first.to_bytes(), cfg=relu)


def test_panneal_anneals_p_and_the_controller_hits_its_targets():
    cfg = _cfg("panneal", penalty=PenaltyConfig.power(0.5), total_tokens=256 * 600,
               log_every=25, control_frac=0.8)  # anneal over 0.4 of training: 240 steps
    assert PAnneal.p_at(cfg, 0) == 1.0 and PAnneal.p_at(cfg, cfg.total_steps - 1) == 0.5
    assert PAnneal.p_at(cfg, 120) == pytest.approx(0.75)  # half of the 240-step anneal
    results = train_ladder(cfg, TARGETS, _planted())
    for target, res in zip(TARGETS, results, strict=True):
        ps = [row["p"] for row in res.history]
        assert ps[0] == pytest.approx(1 - 0.5 * 24 / 240) and ps[-1] == 0.5
        assert all(a >= b for a, b in zip(ps, ps[1:]))
        assert res.sae.architecture == "standard" and res.status == FINISHED
        l0 = (res.sae.encode(HELD_OUT) > 0).float().sum(-1).mean().item()
        assert abs(l0 / target - 1) <= 0.15, (target, l0)
