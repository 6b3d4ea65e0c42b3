"""The `pythia-70m` preset rehearsed on CPU, offline (issue #16).

A random-weight checkpoint with Pythia-70M-deduped's exact config (tests/pythia_checkpoint.py)
stands in for the hub model; the real CLI then runs `raysae search --preset pythia-70m` on it
end to end (activation cache, the references and search stages, tables, report) with only
amounts lowered (tokens, batch size, held-out sizes, trials, seeds): the preset's hook, cache
dtype, SAE width (4x) and L0 ladder (8 .. 256) stay as they are. The corpus is the stdlib
(the preset's, the Pile, is a hub dataset). Random weights make the CE numbers meaningless
(ce_zero ~ ce_clean ~ ln 50304), so only the plumbing is checked.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pythia_checkpoint import PYTHIA_70M_CONFIG, build_pythia70m_checkpoint

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.3.hook_resid_post"
PRESET_TARGETS = [8.0, 16.0, 32.0, 64.0, 128.0, 256.0]
REFERENCES = {"L1", "sqrt", "sqrt(sqrt)", "TopK", "BatchTopK"}


@pytest.fixture(scope="module")
def pythia_dir(tmp_path_factory):
    return build_pythia70m_checkpoint(tmp_path_factory.mktemp("pythia-70m-random"))


def test_checkpoint_maps_to_pythia_70m(pythia_dir):
    """transformers and TransformerLens 4 read the folder as Pythia-70M-deduped's shape."""
    import torch
    from transformers import GPTNeoXForCausalLM

    from raysae.lm.models import check_hook, hook_activations, load_model

    assert json.loads((pythia_dir / "config.json").read_text()) == PYTHIA_70M_CONFIG
    hf = GPTNeoXForCausalLM.from_pretrained(pythia_dir)
    assert sum(p.numel() for p in hf.parameters()) == 70_426_624  # Pythia-70M's count
    assert hf.config.rope_parameters["partial_rotary_factor"] == 0.25
    assert hf.config.rope_parameters["rope_theta"] == 10000
    assert hf.gpt_neox.rotary_emb.inv_freq.numel() == 8  # 16 of each head's 64 dims rotate
    unembed, embed = hf.get_output_embeddings().weight, hf.get_input_embeddings().weight
    assert unembed.data_ptr() != embed.data_ptr()  # untied
    del hf

    model = load_model(pythia_dir, device="cpu")
    cfg = model.cfg
    assert cfg.architecture == "GPTNeoXForCausalLM"
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab,
            cfg.n_ctx) == (512, 6, 8, 64, 2048, 50304, 2048)
    assert cfg.parallel_attn_mlp and cfg.act_fn == "gelu" and cfg.eps == 1e-5
    assert cfg.positional_embedding_type == "rotary" and cfg.rotary_base == 10000
    assert check_hook(model, HOOK) == HOOK
    tokens = torch.randint(1, len(model.tokenizer), (2, 16))
    acts = hook_activations(model, tokens, HOOK)
    assert acts.shape == (2, 16, 512) and torch.isfinite(acts).all()


def test_pythia_70m_preset_end_to_end(pythia_dir, tmp_path):
    """`raysae search --preset pythia-70m --model <random Pythia-70M>`: a float16 cache of
    blocks.3's residual stream (d_in 512), the references and a searched trial on the
    preset's whole L0 ladder (d_sae 2048), the tables and the report."""
    import pandas as pd

    from raysae.activations.cache import CacheError, load_manifest

    cache_dir, results = tmp_path / "raysae-cache", tmp_path / "results"
    env = {**os.environ, "RAYSAE_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "RAY_ADDRESS": "", "RAYSAE_RAY_ADDRESS": ""}
    # Only amounts are lowered (tokens, batch, held-out sizes, trials); --seeds 0 skips the
    # confirmation stage, which has nothing model-specific and would double the wall time.
    cmd = [sys.executable, "-m", "raysae", "search", "--preset", "pythia-70m",
           "--model", str(pythia_dir), "--corpus", "stdlib", "--address", "local",
           "--cache-tokens", "8192", "--total-tokens", "4096", "--batch-size", "1024",
           "--log-every", "1", "--eval-blocks", "2", "--feature-tokens", "2048",
           "--num-trials", "1", "--seeds", "0",
           "--storage", str(tmp_path / "tune"), "--results", str(results),
           "--name", "pythia_rehearsal"]
    start = time.time()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    print(f"pythia-70m rehearsal: {time.time() - start:.0f} s")
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])
    assert f"raysae: report: {results / 'report.html'}" in out.stdout

    manifests = []
    for folder in (cache_dir / "activations").iterdir():
        if not folder.is_dir():  # a build's lock file
            continue
        try:
            manifests.append(load_manifest(folder))
        except CacheError:  # not a finished cache (a leftover partial build)
            continue
    assert len(manifests) == 1, manifests
    manifest = manifests[0]
    assert manifest["dtype"] == "float16"  # the preset's cache dtype (no flag given)
    assert manifest["d_in"] == 512
    assert manifest["hook"] == HOOK

    trials = pd.read_parquet(results / "trials.parquet")
    assert set(trials["status"]) == {"finished"}, trials[["label", "status", "status_reason"]]
    assert trials["trial_id"].is_unique
    assert sorted(set(trials["target_l0"])) == PRESET_TARGETS
    refs = trials[trials["stage"] == "refs"]
    assert set(refs["label"]) == REFERENCES
    assert len(refs) == len(REFERENCES) * len(PRESET_TARGETS)
    searched = trials[trials["stage"] == "search"]
    assert len(searched) == len(PRESET_TARGETS) and searched["kind"].eq("relu").all()
    assert len(trials) == len(refs) + len(searched)
    for column in ("l0", "fvu", "ce_clean", "ce_sae", "ce_zero"):
        assert trials[column].map(math.isfinite).all(), column
    # random weights: the LM is near uniform over its 50304 logits, CE ~ ln(50304) = 10.83
    assert abs(trials["ce_clean"].iloc[0] - math.log(50304)) < 0.5
    assert (trials["steps"] == 4096 // 1024).all()
    assert (results / "report.html").stat().st_size > 10_000
