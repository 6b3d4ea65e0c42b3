"""The fixed-k sparse decoder (TopK, BatchTopK): equals the dense decoder in values and
gradients, trains as the dense step does, resumes exactly, and never syncs with the host
between logging steps."""

import pytest
import torch
from planted import planted_batches

from raysae.core.config import PenaltyConfig, SAEConfig, TrainConfig
from raysae.core.fixed_k import FixedKFeatures, fixed_k_decode
from raysae.core.kinds import KINDS
from raysae.core.ladder import LadderTrainer
from raysae.core.ladder_sae import LadderSAE

D_IN, D_SAE, N_TRUE, K_ACTIVE = 16, 64, 32, 4
TARGETS = [2.0, 5.0, 3.5]  # different k per member, the largest not first
FIXED = sorted(name for name, kind in KINDS.items() if kind.fixed_k)


def _model(kind, seed=0):
    model = LadderSAE(SAEConfig(D_IN, D_SAE), [seed, seed + 1, seed + 2], kind=kind,
                       targets=TARGETS)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        model.b_dec.normal_(0, 0.1, generator=gen)
        model.b_enc.normal_(0, 0.1, generator=gen)
    return model


def _cfg(**kw):
    base = dict(sae=SAEConfig(D_IN, D_SAE), penalty=PenaltyConfig.power(p=0.5), lam=0.3,
                total_tokens=256 * 40, batch_size=256, lr=3e-3, log_every=10, seed=3,
                dead_window_tokens=256 * 5)
    base.update(kw)
    return TrainConfig(**base)


def _planted(steps, batch_size=256, seed=1):
    return list(planted_batches(D_IN, N_TRUE, K_ACTIVE, batch_size, seed, steps))


def test_the_fixed_k_kinds_are_topk_and_the_batchtopk_family():
    assert FIXED == ["batchtopk", "matryoshka", "topk"]


@pytest.mark.parametrize("kind", FIXED)
def test_decode_values_gradients_fires_and_dense_equal_the_dense_path(kind):
    x = torch.randn(37, D_IN, generator=torch.Generator().manual_seed(5))
    runs = {}
    for sparse in (False, True):
        model = _model(kind)
        pre = model.pre_acts(x)
        if sparse:
            feats = model.kind.activate_fixed(model, pre)
            assert isinstance(feats, FixedKFeatures) and feats.index.dtype == torch.int64
            x_hat, f, fires = fixed_k_decode(model, feats), feats.dense(), feats.fires()
        else:
            f = model.kind.activate(model, pre)
            x_hat, fires = model.decode(f), (f.detach() > 0).sum(dim=1, dtype=torch.int32)
        (x_hat - x).pow(2).sum().backward()
        state = model.state.batch_min.clone() if kind == "batchtopk" else None
        runs[sparse] = (x_hat.detach(), f.detach(), fires, state,
                        {n: p.grad for n, p in model.named_parameters()})
    (d_hat, d_f, d_fires, d_state, d_grads), (hat, f, fires, state, grads) = runs[False], runs[True]
    l0 = (d_f > 0).sum(-1).float().mean(-1)
    assert len(set(l0.tolist())) == 3  # every member keeps its own number
    torch.testing.assert_close(hat, d_hat, rtol=1e-5, atol=1e-5)
    assert torch.equal(f, d_f) and torch.equal(fires, d_fires)
    assert fires.dtype == torch.int32 and fires.shape == (3, D_SAE)
    if kind == "batchtopk":  # the inference threshold's bookkeeping is the same
        assert torch.equal(state, d_state)
    for name, grad in d_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_topk_features_are_grouped_by_token_and_batchtopk_sorted():
    x = torch.randn(29, D_IN)
    for kind in FIXED:
        model = _model(kind)
        feats = model.kind.activate_fixed(model, model.pre_acts(x))
        token = feats.index // D_SAE
        assert (token.diff(dim=-1) >= 0).all()
        if kind in ("batchtopk", "matryoshka"):  # one selection over the whole batch
            assert (feats.index.diff(dim=-1) > 0).all()
            assert feats.per_token is None
        else:
            assert feats.per_token == max(round(t) for t in TARGETS)
            assert feats.values.shape == (3, 29 * feats.per_token)


def test_batchtopk_tokens_without_a_kept_value_decode_to_the_bias():
    model = _model("batchtopk")
    with torch.no_grad():  # only token 3 and 40 fire (so most bags are empty)
        pre = torch.full((3, 50, D_SAE), -1.0)
        pre[:, 3, :20] = torch.rand(3, 20) + 0.5
        pre[:, 40, 20:40] = torch.rand(3, 20) + 0.5
    feats = model.kind.activate_fixed(model, pre.clone())
    dense = model.kind.activate(model, pre.clone())
    torch.testing.assert_close(fixed_k_decode(model, feats), model.decode(dense))
    assert torch.equal(feats.dense(), dense)
    assert (feats.values > 0).sum() == (dense > 0).sum()


def test_fixed_k_decode_under_bf16_autocast():
    x = torch.randn(40, D_IN)
    for kind in FIXED:
        model = _model(kind)
        with torch.autocast("cpu", torch.bfloat16):
            feats = model.kind.activate_fixed(model, model.pre_acts(x))
            x_hat = fixed_k_decode(model, feats)
            ref = model.decode(feats.dense())
        assert x_hat.dtype == torch.float32 and torch.isfinite(x_hat).all()
        torch.testing.assert_close(x_hat, ref.float(), rtol=2e-2, atol=2e-2)
        x_hat.pow(2).sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("kind", FIXED)
def test_sparse_step_trains_as_the_dense_step(kind):
    """Same init, same batches, 40 steps (AuxK on: the dead window is 5 batches): the
    fixed-k step and the dense step end with the same weights and logged L0."""
    batches = _planted(40)
    runs = {}
    for mode in ("off", "on"):
        trainer = LadderTrainer(_cfg(kind=kind, sparse_step=mode), [2.0, 4.0, 8.0])
        assert trainer.sparse_now() == (mode == "on")
        for x in batches:
            trainer.step(x)
        runs[mode] = trainer
    dense, sparse = runs["off"], runs["on"]
    aux = [[r["penalty_loss"] for r in rows] for rows in dense.history]
    assert any(v > 0 for rows in aux for v in rows)  # AuxK had dead features to work on
    for name, p in dense.model.named_parameters():
        torch.testing.assert_close(getattr(sparse.model, name), p, rtol=1e-5, atol=1e-5,
                                   msg=name)
    for d_rows, s_rows in zip(dense.history, sparse.history, strict=True):
        assert [r["l0"] for r in s_rows] == pytest.approx([r["l0"] for r in d_rows], abs=1e-6)
        for field in ("loss", "penalty_loss"):
            assert [r[field] for r in s_rows] == pytest.approx([r[field] for r in d_rows],
                                                               rel=1e-3, abs=1e-7)
    if kind == "batchtopk":
        torch.testing.assert_close(sparse.model.state.threshold, dense.model.state.threshold,
                                   rtol=1e-4, atol=1e-6)
    assert torch.equal(sparse.last_fired, dense.last_fired)


def test_sparse_step_resumes_exactly():
    cfg = _cfg(kind="topk", sparse_step="on", total_tokens=256 * 20)
    batches = _planted(20)
    full = LadderTrainer(cfg, [2.0, 4.0, 8.0])
    for x in batches:
        full.step(x)
    half = LadderTrainer(cfg, [2.0, 4.0, 8.0])
    for x in batches[:10]:
        half.step(x)
    resumed = LadderTrainer.from_bytes(half.to_bytes())
    for x in batches[10:]:
        resumed.step(x)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(full.model, name), getattr(resumed.model, name))
    assert resumed.history == full.history


@pytest.mark.parametrize("kind", FIXED)
def test_auto_keeps_the_dense_decoder_unless_fixed_k_auto_is_on(kind, monkeypatch):
    """'auto' decodes densely (the fixed-k decoder measured slower: FIXED_K_AUTO); with
    FIXED_K_AUTO it would pick the fixed-k decoder for small k, on any device."""
    from raysae.core import ladder as step_choice

    small = LadderTrainer(_cfg(kind=kind, sparse_step="auto"), [2.0, 6.0])
    large = LadderTrainer(_cfg(kind=kind, sparse_step="auto"), [2.0, 7.0])  # 7 > 64 / 10
    on = LadderTrainer(_cfg(kind=kind, sparse_step="on"), [2.0, 7.0])
    off = LadderTrainer(_cfg(kind=kind, sparse_step="off"), [2.0, 6.0])
    assert not small.sparse_now() and on.sparse_now() and not off.sparse_now()
    monkeypatch.setattr(step_choice, "FIXED_K_AUTO", True)
    assert small.sparse_now() and not large.sparse_now() and not off.sparse_now()
    small.device = torch.device("cuda")  # only asked, not run: the decision is device-free
    assert small.sparse_now()
