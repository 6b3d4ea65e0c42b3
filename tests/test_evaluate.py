"""Spliced CE checked against an independent plain-HF forward hook; feature statistics."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from raysae.core.config import SAEConfig, TrainConfig
from raysae.core.sae import SAE
from raysae.core.train import train_sae
from raysae.evaluation import feature_stats
from raysae.evaluation.spliced_ce import (
    Evaluator,
    evaluate_sae,
    feature_statistics,
    heldout_evaluator,
)
from raysae.lm import corpus
from raysae.lm.models import hook_activations

HOOK = "blocks.0.hook_resid_post"
CTX = 32
EVAL_KEYS = {"ce_clean", "ce_sae", "ce_zero", "ce_recovered", "l0", "mse", "fvu", "cos_sim",
             "l2_ratio", "dead_fraction", "low_freq_fraction", "median_nonzero"}


def train_small_sae(model, hook=HOOK, steps=300, lam=1.0, d_sae=128):
    """A small SAE trained on the tiny model's train-split activations (~1 s)."""
    blocks = corpus.token_blocks(corpus.STDLIB, model, CTX, split="train", max_blocks=256)
    acts = hook_activations(model, torch.as_tensor(blocks), hook)[:, 1:]
    acts = acts.reshape(-1, acts.shape[-1])
    gen = torch.Generator().manual_seed(0)

    def batches():
        while True:
            yield from (acts[i] for i in torch.randperm(len(acts), generator=gen).split(256)
                        if len(i) == 256)

    cfg = TrainConfig(sae=SAEConfig(acts.shape[1], d_sae), lam=lam, total_tokens=256 * steps,
                      batch_size=256, lr=3e-3)
    return train_sae(cfg, batches()).sae


def identity_sae(d):
    """relu(x) - relu(-x) = x exactly: encoder [I, -I], decoder [I; -I], zero biases."""
    sae = SAE(SAEConfig(d, 2 * d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def zero_sae(d):
    sae = SAE(SAEConfig(d, 4 * d))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
    return sae


@pytest.fixture(scope="module")
def tokens(tiny_model):
    return corpus.heldout_blocks(tiny_model, CTX, max_blocks=12)


@pytest.fixture(scope="module")
def evaluator(tiny_model, tokens):
    return Evaluator(tiny_model, HOOK, tokens, batch_size=5)


@pytest.fixture(scope="module")
def trained(tiny_model):
    return train_small_sae(tiny_model)


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    """The same checkpoint loaded independently with plain transformers (no bridge)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def reference_ce(hf, tokens, replace=None):
    """Mean next-token CE with layer 0's output at positions 1.. replaced by replace(x)."""
    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        new = out.clone()
        new[:, 1:] = replace(out[:, 1:])
        return (new, *output[1:]) if isinstance(output, tuple) else new

    ids = torch.as_tensor(tokens)
    handle = hf.gpt_neox.layers[0].register_forward_hook(hook) if replace else None
    try:
        with torch.no_grad():
            logits = hf(input_ids=ids).logits
    finally:
        if handle:
            handle.remove()
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1)).item()


def test_ce_matches_plain_hf_forward_hook(evaluator, trained, hf_model, tokens):
    got = evaluator.evaluate(trained)
    assert evaluator.resumes  # the fast path (layers after the hook only) is what is checked
    with torch.no_grad():
        want_sae = reference_ce(hf_model, tokens, lambda x: trained(x)[0])
    assert got["ce_clean"] == pytest.approx(reference_ce(hf_model, tokens), abs=1e-4)
    assert got["ce_sae"] == pytest.approx(want_sae, abs=1e-4)
    assert got["ce_zero"] == pytest.approx(reference_ce(hf_model, tokens, torch.zeros_like),
                                           abs=1e-4)
    assert got["ce_clean"] < got["ce_sae"] < got["ce_zero"]  # a real SAE lies in between
    gap = got["ce_zero"] - got["ce_clean"]
    assert got["ce_recovered"] == pytest.approx((got["ce_zero"] - got["ce_sae"]) / gap)


def test_exact_sae_gives_clean_ce_and_zero_sae_gives_zero_ce(evaluator):
    d = evaluator.d_in
    exact = evaluator.evaluate(identity_sae(d))
    assert exact["ce_sae"] == pytest.approx(exact["ce_clean"], abs=1e-6)
    assert exact["mse"] == 0 and exact["fvu"] == 0 and exact["ce_recovered"] == pytest.approx(1)
    zeros = evaluator.evaluate(zero_sae(d))
    assert zeros["ce_sae"] == pytest.approx(zeros["ce_zero"], abs=1e-6)
    assert zeros["l0"] == 0 and zeros["ce_recovered"] == pytest.approx(0, abs=1e-6)


def test_per_block_ce_averages_to_ce_sae_and_identity_gives_clean_blocks(evaluator, trained,
                                                                        tokens):
    n_blocks, ctx = np.asarray(tokens).shape
    # every block has the same number of predictions, so the weighted mean is the plain mean
    assert evaluator.n_predictions == n_blocks * (ctx - 1)
    got = evaluator.evaluate(trained)
    blocks = got["ce_sae_blocks"]
    assert isinstance(blocks, list) and len(blocks) == n_blocks
    assert all(isinstance(v, float) for v in blocks)
    assert np.mean(blocks) == pytest.approx(got["ce_sae"], abs=1e-9)
    assert len(evaluator.ce_clean_blocks) == n_blocks
    assert np.mean(evaluator.ce_clean_blocks) == pytest.approx(evaluator.ce_clean, abs=1e-9)
    assert np.ptp(blocks) > 0  # blocks differ: the list is per block, not a repeated mean
    exact = evaluator.evaluate(identity_sae(evaluator.d_in))
    np.testing.assert_allclose(exact["ce_sae_blocks"], evaluator.ce_clean_blocks, atol=1e-5)
    # block order: the per-block clean CE of each block alone equals its entry
    single = Evaluator(evaluator.model, HOOK, np.asarray(tokens)[[3]])
    assert single.ce_clean_blocks == pytest.approx([evaluator.ce_clean_blocks[3]], abs=1e-5)


def test_evaluate_runs_no_layer_before_the_hook(tiny_model, evaluator, trained):
    calls = []
    layer0 = tiny_model.original_model.gpt_neox.layers[0]
    handle = layer0.register_forward_hook(lambda *a: calls.append(1))
    try:
        evaluator.evaluate(trained)
    finally:
        handle.remove()
    assert calls == []


def test_full_forward_fallback_agrees(tiny_model, tokens, evaluator, trained):
    slow = Evaluator(tiny_model, HOOK, tokens, batch_size=4, resume=False)
    assert not slow.resumes
    fast_res, slow_res = evaluator.evaluate(trained), slow.evaluate(trained)
    for key in ("ce_clean", "ce_zero", "ce_sae", "l0", "mse", "fvu"):
        assert slow_res[key] == pytest.approx(fast_res[key], abs=1e-5), key


def test_non_residual_hook_uses_full_forward_and_matches_hf(tiny_model, tokens, hf_model):
    ev = Evaluator(tiny_model, "blocks.0.hook_mlp_out", tokens, batch_size=6)
    assert not ev.resumes  # not a residual hook: full forwards with a replacing hook
    sae = SAE(SAEConfig(ev.d_in, 64), seed=1)
    got = ev.evaluate(sae)
    with torch.no_grad():
        want = _mlp_reference_ce(hf_model, tokens, lambda x: sae(x)[0])
    assert got["ce_sae"] == pytest.approx(want, abs=1e-4)
    assert got["ce_clean"] == pytest.approx(reference_ce(hf_model, tokens), abs=1e-4)


def _mlp_reference_ce(hf, tokens, replace):
    def hook(module, args, output):
        new = output.clone()
        new[:, 1:] = replace(output[:, 1:])
        return new

    handle = hf.gpt_neox.layers[0].mlp.register_forward_hook(hook)
    try:
        return reference_ce(hf, tokens)
    finally:
        handle.remove()


def test_transform_is_applied_before_decoding(evaluator, trained):
    base = evaluator.evaluate(trained)
    none = evaluator.evaluate(trained, transform=torch.zeros_like)
    assert none["l0"] == 0 and base["l0"] > 0
    x = evaluator.activations()
    assert none["mse"] == pytest.approx((x - trained.b_dec.detach()).pow(2).mean().item(),
                                        rel=1e-5)


def test_evaluate_sae_reports_every_trial_key(evaluator, trained):
    out = evaluate_sae(evaluator, trained)
    assert set(out) >= EVAL_KEYS
    assert 0 <= out["dead_fraction"] <= 1 and out["median_nonzero"] > 0
    assert out["feature_tokens"] == evaluator.n_tokens == 12 * (CTX - 1)


def test_heldout_evaluator_uses_heldout_blocks(tiny_model, tokens):
    ev = heldout_evaluator(tiny_model, HOOK, n_blocks=12, context_length=CTX, batch_size=6)
    assert torch.equal(ev.tokens, torch.as_tensor(tokens))


def test_bad_inputs_raise_value_errors(tiny_model, tokens, evaluator):
    with pytest.raises(ValueError, match="integer token ids"):
        Evaluator(tiny_model, HOOK, np.asarray(tokens, dtype=np.float32))
    with pytest.raises(ValueError, match="vocabulary"):
        Evaluator(tiny_model, HOOK, np.asarray(tokens) + 10_000)
    with pytest.raises(ValueError, match="shape"):
        Evaluator(tiny_model, HOOK, np.asarray(tokens)[0])
    with pytest.raises(ValueError, match="is not a hook of model"):
        Evaluator(tiny_model, "blocks.0.hook_resid_middle", tokens)
    with pytest.raises(ValueError, match="d_in"):
        evaluator.evaluate(SAE(SAEConfig(evaluator.d_in + 1, 8)))


def test_feature_statistics_match_direct_computation(evaluator, trained, tmp_path):
    per, sample = feature_statistics(evaluator, trained, n_tokens=300)
    assert list(per.columns[:3]) == ["feature", "frequency", "fires"]
    assert {"median_nonzero", "max_activation", "log10_frequency"} <= set(per.columns)
    assert per.attrs["n_tokens"] == 300
    with torch.no_grad():
        f = trained.encode(evaluator.activations()[:300])
    np.testing.assert_allclose(per["frequency"], (f > 0).float().mean(0).numpy(), rtol=1e-6)
    for i in np.flatnonzero(per["fires"].to_numpy() > 0)[:10]:
        col = f[:, i][f[:, i] > 0]
        assert per["median_nonzero"][i] == pytest.approx(torch.quantile(col, 0.5).item(),
                                                         rel=1e-5)
        assert per["max_activation"][i] == pytest.approx(col.max().item(), rel=1e-6)
    assert per.loc[per["fires"] == 0, "median_nonzero"].isna().all()
    nz = f[f > 0]
    assert sorted(sample["activation"]) == pytest.approx(sorted(nz.tolist()), rel=1e-6)
    summary = feature_stats.summarize(per, sample)
    assert summary["dead_count"] == int(((f > 0).sum(0) == 0).sum())
    assert summary["median_nonzero"] == pytest.approx(nz.median().item(), rel=1e-6)
    paths = feature_stats.save_feature_statistics(tmp_path, per, sample)
    back = pd.read_parquet(paths["feature_stats"])
    pd.testing.assert_frame_equal(back, per, check_like=True)
    hist = pd.read_parquet(paths["frequency_histogram"])
    assert hist["count"].sum() == int((per["fires"] > 0).sum())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_feature_statistics_sample_and_token_limits(trained):
    x = torch.randn(5000, trained.cfg.d_in)
    per, sample = feature_statistics(x, trained, n_tokens=4500)
    assert per.attrs["n_tokens"] == 4500
    assert sample["token"].max() < feature_stats.SAMPLE_TOKENS
    assert sample.attrs["n_tokens"] == feature_stats.SAMPLE_TOKENS
    capped, _ = feature_stats.feature_statistics(x, trained, n_tokens=4500, max_nonzero=10)
    np.testing.assert_array_equal(capped["frequency"], per["frequency"])
    assert capped.attrs["median_tokens"] < 4500
