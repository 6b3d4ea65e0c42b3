"""The sparse training step equals the dense one; no step syncs with the host outside
logging steps; bf16 autocast keeps the loss and the weights fp32."""

import dataclasses

import pytest
import torch
from planted import planted_batches

from raysae.core.config import PenaltyConfig, SAEConfig, TrainConfig
from raysae.core.ladder import LadderTrainer
from raysae.core.ladder_sae import LadderSAE
from raysae.core.penalties import penalty_per_token
from raysae.core.sparse_step import active_forward

D_IN, D_SAE = 32, 256


def _cfg(**kw):
    base = dict(sae=SAEConfig(D_IN, D_SAE), penalty=PenaltyConfig.power(0.5), lam=0.3,
                total_tokens=256 * 60, batch_size=256, lr=3e-3, log_every=10,
                activation_scale=1.0)
    base.update(kw)
    return TrainConfig(**base)


def _sparse_model(k=3, seed=0):
    model = LadderSAE(SAEConfig(D_IN, D_SAE), list(range(seed, seed + k)))
    with torch.no_grad():  # about 5% of features fire, different per member
        model.b_enc -= torch.linspace(1.5, 2.5, k).unsqueeze(1)
        model.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    return model


@pytest.mark.parametrize("penalty", [PenaltyConfig.power(1.0), PenaltyConfig.power(0.5),
                                     PenaltyConfig.power(0.3, 0.01),
                                     PenaltyConfig("tanh", {"c": 3.0})])
def test_values_and_gradients_equal_the_dense_step(penalty):
    x = torch.randn(200, D_IN)
    grads = []
    for sparse in (False, True):
        model = _sparse_model()
        if sparse:
            x_hat, active = active_forward(model, x)
            rho = penalty_per_token(penalty.name, active.values.unsqueeze(-1), penalty.params)
            pen, f = active.per_member(rho), active.dense()
        else:
            x_hat, f = model(x)
            pen = penalty_per_token(penalty.name, f, penalty.params).sum(-1)
        ((x_hat - x).pow(2).sum(-1).mean(-1) + pen / 200).sum().backward()
        grads.append((x_hat.detach(), f.detach(), pen.detach(),
                      [p.grad for p in model.parameters()]))
    (dense_hat, dense_f, dense_pen, dense_g), (hat, f, pen, g) = grads
    assert 0.01 < (f > 0).float().mean() < 0.2  # the test is about sparse features
    torch.testing.assert_close(hat, dense_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f, dense_f)
    torch.testing.assert_close(pen, dense_pen, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, dense_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_no_active_feature_gives_the_decoder_bias():
    model = _sparse_model(k=2)
    with torch.no_grad():
        model.b_enc.fill_(-1e6)
    x_hat, active = active_forward(model, torch.randn(10, D_IN))
    assert active.values.numel() == 0
    torch.testing.assert_close(x_hat, model.b_dec.detach().unsqueeze(1).expand(2, 10, D_IN))


@pytest.mark.parametrize("penalty", [PenaltyConfig.power(1.0), PenaltyConfig.power(0.5)])
def test_sparse_training_ends_at_the_dense_loss(penalty):
    """Same init, same batches, 60 steps with the controller: the sparse and the dense step
    end at the same loss and L0 (they differ only in the order of float sums)."""
    batches = list(planted_batches(D_IN, 128, 4, steps=60, batch_size=256))
    runs = {}
    for mode in ("off", "on"):
        cfg = _cfg(penalty=penalty, sparse_step=mode, l0_target=8.0, log_every=20)
        trainer = LadderTrainer(cfg, [cfg.l0_target])
        for x in batches:
            trainer.step(x)
        runs[mode] = trainer.history[0][-1]
    dense, sparse = runs["off"], runs["on"]
    assert sparse["loss"] == pytest.approx(dense["loss"], rel=2e-3)
    assert sparse["l0"] == pytest.approx(dense["l0"], rel=0.02)
    assert sparse["lam"] == pytest.approx(dense["lam"], rel=1e-3)


def test_auto_switches_to_the_sparse_step_once_l0_is_low_and_resumes_it():
    cfg = _cfg(l0_target=4.0, total_tokens=256 * 200, log_every=25)
    trainer = LadderTrainer(cfg, [4.0, 8.0])
    batches = planted_batches(D_IN, 128, 4, steps=200, batch_size=256)
    assert not trainer.sparse_now()  # a fresh SAE fires about half its features
    for x in batches:
        trainer.step(x)
        if trainer.sparse_now():
            break
    assert trainer.step_count % 25 == 0
    mean_l0 = sum(history[-1]["l0"] for history in trainer.history) / 2
    assert mean_l0 <= D_SAE / 10
    again = LadderTrainer.from_bytes(trainer.to_bytes())
    assert again.sparse_now()
    off = LadderTrainer(dataclasses.replace(cfg, sparse_step="off"), [4.0, 8.0])
    off.sparse_auto = True
    assert not off.sparse_now()


class _SyncCounter:
    """Counts the Python-level ways a tensor's value reaches the host."""

    NAMES = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__",
             "__index__", "__array__")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("kind, sparse_step", [("relu", "off"), ("relu", "on"),
                                               ("panneal", "auto"), ("topk", "auto"),
                                               ("topk", "on"),
                                               ("batchtopk", "auto"), ("batchtopk", "on"),
                                               ("matryoshka", "auto"),
                                               ("matryoshka", "on"), ("jumprelu", "auto")])
def test_no_host_sync_in_100_steps_between_logging_steps(monkeypatch, kind, sparse_step):
    cfg = _cfg(kind=kind, sparse_step=sparse_step, total_tokens=256 * 101, log_every=101)
    trainer = LadderTrainer(cfg, [4.0, 8.0])
    batches = list(planted_batches(D_IN, 128, 4, steps=101, batch_size=256))
    trainer.step(batches[0])  # warm: lazy state, allocator
    counter = _SyncCounter(monkeypatch)
    for x in batches[1:100]:
        assert trainer.step(x) is None
    assert counter.calls == []
    assert trainer.step(batches[100]) is not None  # the logging step reads the device
    assert counter.calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kind, sparse_step", [("relu", "auto"), ("topk", "on"),
                                               ("batchtopk", "on"), ("matryoshka", "on")])
def test_no_device_sync_on_a_gpu(kind, sparse_step):
    """Dense relu, and the fixed-k decoder of every fixed-k kind."""
    cfg = _cfg(kind=kind, sparse_step=sparse_step, device="cuda", total_tokens=256 * 60,
               log_every=1000)
    trainer = LadderTrainer(cfg, [4.0, 8.0])
    batches = [x.cuda() for x in planted_batches(D_IN, 128, 4, steps=60, batch_size=256)]
    trainer.step(batches[0])
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x in batches[1:50]:
            trainer.step(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_bf16_autocast_trains_with_fp32_loss_and_weights():
    batches = list(planted_batches(D_IN, 128, 4, steps=40, batch_size=256))
    rows = {}
    for bf16 in (False, True):
        cfg = _cfg(autocast_bf16="on" if bf16 else "off", sparse_step="off",
                   total_tokens=256 * 40, log_every=40)
        trainer = LadderTrainer(cfg, [8.0])
        for x in batches:
            trainer.step(x)
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
        rows[bf16] = trainer.history[0][-1]
    assert torch.isfinite(torch.tensor(rows[True]["loss"]))
    assert rows[True]["loss"] == pytest.approx(rows[False]["loss"], rel=0.05)
