"""Spliced CE checked against an independent plain-HF forward hook; feature statistics."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from raysae.core import metrics
from raysae.core.config import SAEConfig, TrainConfig
from raysae.core.sae import SAE
from raysae.core.training import drive, ladder_of_one
from raysae.evaluation import ablation, feature_stats
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
    return drive(ladder_of_one(cfg), batches())[0].sae


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


def reference_block_ce(ev, x_new):
    """Per-block CE with the replaced positions set to ``x_new`` [n_tokens, d_in], read to the
    host batch by batch (as the evaluator did before it stayed on the device)."""
    blocks, start = [], 0
    with torch.no_grad():
        for toks, acts in ev._batches:
            n = toks.shape[0] * (toks.shape[1] - ev.first)
            logits = ev._logits(toks, ev._patch(acts, x_new[start:start + n]))
            start += n
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), toks[:, 1:].flatten(),
                                 reduction="none")
            blocks += ce.view(len(toks), -1).double().mean(1).tolist()
    return blocks


def reference_evaluate(ev, sae, transform=None):
    """``Evaluator.evaluate``'s numbers computed the straightforward way: CE per batch on the
    host, reconstruction metrics of ``raysae.core.metrics`` on all tokens at once."""
    x = ev.activations()
    with torch.no_grad():
        f = sae.encode(x)
        f = f if transform is None else transform(f)
        x_hat = sae.decode(f)
    blocks = reference_block_ce(ev, x_hat)
    ce_sae, ce_zero = float(np.mean(blocks)), float(np.mean(reference_block_ce(ev, 0 * x)))
    return {"ce_clean": ev.ce_clean, "ce_sae": ce_sae, "ce_sae_blocks": blocks,
            "ce_zero": ce_zero,
            "ce_recovered": (ce_zero - ce_sae) / (ce_zero - ev.ce_clean),
            "l0": metrics.l0(f), "mse": metrics.mse(x, x_hat), "fvu": metrics.fvu(x, x_hat),
            "cos_sim": metrics.cos_sim(x, x_hat), "l2_ratio": metrics.l2_ratio(x, x_hat)}


@pytest.mark.parametrize("batch_size", [1, 5, 12])
def test_evaluate_equals_the_reference_computation(tiny_model, tokens, trained, batch_size):
    ev = Evaluator(tiny_model, HOOK, tokens, batch_size=batch_size)
    for transform in (None, lambda f: ablation.lowest_k(f, 3)):
        got, want = ev.evaluate(trained, transform), reference_evaluate(ev, trained, transform)
        assert list(got) == list(want)
        assert all(type(v) is float for k, v in got.items() if k != "ce_sae_blocks")
        assert all(type(v) is float for v in got["ce_sae_blocks"])
        np.testing.assert_allclose(got["ce_sae_blocks"], want["ce_sae_blocks"], rtol=1e-5)
        for key in set(got) - {"ce_sae_blocks"}:
            assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert ev.ce_with(lambda a: a) == pytest.approx(ev.ce_clean, rel=1e-6)


def previous_feature_statistics(source, sae, n_tokens, sample_tokens=feature_stats.SAMPLE_TOKENS,
                                max_nonzero=feature_stats.MAX_NONZERO):
    """``feature_statistics`` as it was before it stayed on the device (every chunk copied to
    the host, its nonzero count read per chunk): the reference for identical output."""
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    tokens, nnz, sample, feats, vals, l0s = 0, 0, [], [], [], []
    for f in feature_stats.feature_batches(source, sae, n_tokens):
        f = f.cpu()
        counts += (f > 0).sum(dim=0).double()
        tokens += f.shape[0]
        got = sum(s.shape[0] for s in sample)
        if got < sample_tokens:
            sample.append(f[: sample_tokens - got])
        nnz += int((f > 0).sum())
        if nnz <= max_nonzero:
            tok, feat = f.nonzero(as_tuple=True)
            feats.append(feat)
            vals.append(f[tok, feat].float())
            l0s.append((f > 0).sum(dim=-1).to(torch.int32))
    feat = torch.cat(feats) if feats else torch.zeros(0, dtype=torch.int64)
    val = torch.cat(vals) if vals else torch.zeros(0)
    by_value = torch.argsort(val)
    order = by_value[torch.argsort(feat[by_value], stable=True)]
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64),
                         torch.bincount(feat, minlength=sae.cfg.d_sae).cumsum(0)])
    token_l0 = torch.cat(l0s) if l0s else torch.zeros(0, dtype=torch.int32)
    index = feature_stats.NonzeroIndex(val[order], offsets, token_l0)
    freq = (counts / max(tokens, 1)).float().double().numpy()
    per = pd.DataFrame({
        "feature": np.arange(sae.cfg.d_sae, dtype=np.int64), "frequency": freq,
        "fires": counts.numpy().astype(np.int64),
        "max_activation": index.quantile(1.0).nan_to_num(0.0).numpy().astype(np.float64),
        "median_nonzero": index.quantile(0.5).numpy().astype(np.float64),
        "log10_frequency": np.where(freq > 0, np.log10(np.maximum(freq, 1e-300)), np.nan)})
    per.attrs.update(n_tokens=tokens, median_tokens=index.n_tokens)
    f = torch.cat(sample) if sample else torch.zeros(0, sae.cfg.d_sae)
    tok, feat = f.nonzero(as_tuple=True)
    smp = pd.DataFrame({"token": tok.numpy().astype(np.int64),
                        "feature": feat.numpy().astype(np.int64),
                        "activation": f[tok, feat].numpy().astype(np.float64)})
    smp.attrs.update(n_tokens=int(f.shape[0]))
    return per, smp


def test_feature_statistics_equal_the_previous_implementation(evaluator, trained):
    x = torch.randn(9000, trained.cfg.d_in, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        total = int((trained.encode(x) > 0).sum())
    pieces = list(x.split([1000, 3000, 500, 4500]))
    cases = [(evaluator, 300, feature_stats.MAX_NONZERO), (x, 8500, feature_stats.MAX_NONZERO),
             (pieces, None, total // 2), (x, None, total // 2), (pieces, None, 10)]
    median_tokens = set()
    for source, n_tokens, cap in cases:
        got = feature_stats.feature_statistics(source, trained, n_tokens, max_nonzero=cap)
        want = previous_feature_statistics(source, trained, n_tokens, max_nonzero=cap)
        for g, w in zip(got, want, strict=True):
            pd.testing.assert_frame_equal(g, w, check_exact=True)
            assert g.attrs == w.attrs
        median_tokens.add(got[0].attrs["median_tokens"])
    assert 0 in median_tokens and len(median_tokens) == len(cases)  # caps that bite partway


HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__",
              "__index__")


def host_reads(monkeypatch, run, model_calls=()):
    """Calls of the Tensor methods that read values on the host while ``run()`` runs, except
    inside ``model_calls`` ((object, method name) pairs: the model's own forward)."""
    calls, paused = [], []

    def counting(name, orig):
        def counted(self, *a, **kw):
            if not paused:
                calls.append(name)
            return orig(self, *a, **kw)
        return counted

    def unseen(orig):
        def call(*a, **kw):
            paused.append(1)
            try:
                return orig(*a, **kw)
            finally:
                paused.pop()
        return call

    with monkeypatch.context() as m:
        for name in HOST_READS:
            m.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
        for obj, name in model_calls:
            m.setattr(obj, name, unseen(getattr(obj, name)))
        run()
    return sorted(calls)


def evaluation_reads(monkeypatch, tiny_model, tokens, sae, batch_size):
    ev = Evaluator(tiny_model, HOOK, tokens, batch_size=batch_size)
    assert len(ev._batches) == len(tokens) // batch_size
    model = [(ev, "_logits")]
    cal = ablation.calibrate(ev, sae)
    return {
        "evaluate": host_reads(monkeypatch, lambda: ev.evaluate(sae), model),
        "ce_with": host_reads(monkeypatch, lambda: ev.ce_with(torch.zeros_like), model),
        "removes_everything": host_reads(monkeypatch, lambda: ablation.removes_everything(
            ev, sae, lambda f: ablation.global_threshold(f, 1e9))),
        "calibrate": host_reads(monkeypatch, lambda: ablation.calibrate(ev, sae)),
        "sweep": host_reads(monkeypatch, lambda: ablation.threshold_sweep(
            ev, sae, "quantile", n_points=3, calibration=cal), model),
    }


def test_evaluation_reads_the_host_once_not_per_batch(tiny_model, tokens, trained, monkeypatch):
    """2 batches vs 12 (and 2 vs 8 activation chunks): the same host reads, a fixed few."""
    few, many = (evaluation_reads(monkeypatch, tiny_model, tokens, trained, b) for b in (6, 1))
    assert few == many
    assert len(many["evaluate"]) <= 2 and len(many["ce_with"]) <= 2, many
    x = torch.randn(400, trained.cfg.d_in, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cap = int((trained.encode(x) > 0).sum()) * 2 // 3  # bites partway through

    def stats_reads(n_chunks, max_nonzero):
        return host_reads(monkeypatch, lambda: feature_stats.feature_statistics(
            list(x.chunk(n_chunks)), trained, None, max_nonzero=max_nonzero))

    for max_nonzero in (feature_stats.MAX_NONZERO, cap):
        few, many = stats_reads(2, max_nonzero), stats_reads(8, max_nonzero)
        assert few == many
        assert many.count("__int__") == (max_nonzero == cap)  # the cap's one read
