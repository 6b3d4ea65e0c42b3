"""The GPU path's host side, checked on CPU: the reader hands out storage-dtype batches (pinned
where CUDA is), the trainer copies with ``non_blocking`` before it converts, and the
precision settings (bf16 autocast, TF32) reach every trial's training step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from raysae.activations import batches as batches_module
from raysae.activations.batches import iter_activation_batches
from raysae.activations.cache import write_arrays_cache
from raysae.core.config import PenaltyConfig, SAEConfig, TrainConfig
from raysae.core.ladder import LadderTrainer, uses_bf16
from raysae.core.transfer import device_batches

D_IN = 16


@pytest.fixture
def f16_cache(tmp_path):
    acts = np.random.default_rng(0).standard_normal((2048, D_IN)).astype(np.float16)
    return write_arrays_cache(tmp_path / "cache", acts, "float16", shard_rows=512)


def test_reader_pins_storage_dtype_batches_when_cuda_is_present(f16_cache, monkeypatch):
    """Without CUDA: float16 batches in ordinary memory. With CUDA (as a trial with a GPU
    sees it): the same batches, with pinned buffers asked for (the copy to the device can
    then be asynchronous)."""
    plain = next(iter_activation_batches(f16_cache, 256, pin_memory=False))
    assert plain.dtype == torch.float16 and not plain.is_pinned()
    if torch.cuda.is_available():  # a real GPU: pinned by default
        pinned = next(iter_activation_batches(f16_cache, 256))
        assert pinned.dtype == torch.float16 and pinned.is_pinned()
    asked = []
    real = batches_module.BatchBuffers

    class Spy(real):
        def __init__(self, d_in, dtype, *, pin):
            asked.append((dtype, pin))
            super().__init__(d_in, dtype, pin=False)  # no CUDA here to pin with

    monkeypatch.setattr(batches_module, "BatchBuffers", Spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    batch = next(iter_activation_batches(f16_cache, 256))
    assert asked == [("float16", True)] and batch.dtype == torch.float16


class _RecordTo(TorchFunctionMode):
    """Every Tensor.to call: (source dtype, target dtype or None, non_blocking)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            dtype = next((a for a in args[1:] if isinstance(a, torch.dtype)),
                         kwargs.get("dtype"))
            self.calls.append((args[0].dtype, dtype, kwargs.get("non_blocking", False)))
        return func(*args, **kwargs)


def _cfg(**kw):
    return TrainConfig(sae=SAEConfig(D_IN, 32), penalty=PenaltyConfig.power(0.5), lam=0.1,
                       batch_size=64, total_tokens=64 * 10, log_every=100, **kw)


def test_trainer_copies_non_blocking_then_converts_on_the_device():
    trainer = LadderTrainer(_cfg(), [4.0])
    x = torch.randn(64, D_IN).half()
    with _RecordTo() as seen:
        trainer._prepare(x)
    assert seen.calls[:2] == [(torch.float16, None, True), (torch.float16, torch.float32, False)]


def test_device_batches_passes_cpu_batches_through_unchanged():
    xs = [torch.randn(4, D_IN).half() for _ in range(3)]
    out = list(device_batches(iter(xs), "cpu"))
    assert all(a is b for a, b in zip(out, xs, strict=True))


def test_bf16_and_tf32_defaults_and_modes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert TrainConfig().autocast_bf16 == "auto" and TrainConfig().tf32 is True
    assert uses_bf16("auto", cuda) and not uses_bf16("auto", cpu)
    assert uses_bf16("on", cpu) and not uses_bf16("off", cuda)
    with pytest.raises(ValueError, match="autocast_bf16"):
        _cfg(autocast_bf16="yes")
    # checkpoints written before the three modes stored a bool
    old = {**_cfg().to_dict(), "autocast_bf16": True}
    assert TrainConfig.from_dict(old).autocast_bf16 == "on"


@pytest.mark.parametrize("bf16,tf32", [("on", True), ("off", False), ("auto", True)])
def test_precision_settings_reach_the_step(monkeypatch, bf16, tf32):
    """Inside the step the kind's activation sees autocast on exactly when the setting says
    so for this device, and TF32 as set; both are restored after the step."""
    trainer = LadderTrainer(_cfg(autocast_bf16=bf16, tf32=tf32, sparse_step="off"), [4.0])
    seen = []
    real = trainer.kind.activate

    def spy(model, pre):
        seen.append((torch.is_autocast_enabled("cpu"), torch.backends.cuda.matmul.allow_tf32))
        return real(model, pre)

    monkeypatch.setattr(trainer.kind, "activate", spy)
    before = torch.backends.cuda.matmul.allow_tf32
    trainer.step(torch.randn(64, D_IN))
    assert seen == [(bf16 == "on", tf32)]
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_job_precision_flags_reach_every_trial():
    """`--autocast-bf16 off --no-tf32` on the command line end up in each trial's
    TrainConfig (the job's trial template plus the trial's proposal)."""
    import argparse

    from raysae.cli.flags import given
    from raysae.cli.search import add_job_flags
    from raysae.search.config import job_config
    from raysae.search.job import trial_spec
    from raysae.search.trial.spec import train_config

    parser = argparse.ArgumentParser()
    add_job_flags(parser, sweep=False)
    for flags, want in (([], ("auto", True)),
                        (["--autocast-bf16", "off", "--no-tf32"], ("off", False))):
        job = job_config("local", **given(parser.parse_args(flags)))
        spec = trial_spec(job, False, "cache-folder", None, "model-folder", 64)
        cfg = train_config(spec, {"penalty": "power", "p": 0.5, "eps": 0.0, "seed": 1})
        assert (cfg.autocast_bf16, cfg.tf32) == want
    with pytest.raises(SystemExit):
        parser.parse_args(["--autocast-bf16", "yes"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_overlapped_copies_deliver_every_batch_intact_on_cuda():
    """Each batch's step runs on the main stream while the next batch is copied on the side
    stream: every batch arrives whole, in order, and its memory is not reused under it."""
    xs = [torch.randn(4096, 512).half().pin_memory() for _ in range(24)]
    eye = torch.eye(512, device="cuda")
    out = [(y.float() @ eye).sum(dim=0) for y in device_batches(iter(xs), "cuda")]
    for x, got in zip(xs, out, strict=True):
        torch.testing.assert_close(got.cpu(), x.float().sum(dim=0), rtol=1e-3, atol=1e-2)
