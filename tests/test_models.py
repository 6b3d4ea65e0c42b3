import json

import numpy as np
import pytest
import torch

from raysae.lm import corpus
from raysae.lm.local_model import METADATA, LocalModelSpec, build_local_model, read_metadata
from raysae.lm.models import (
    check_hook,
    hook_activations,
    hook_layer,
    load_model,
    stop_layer,
)


def test_tiny_model_is_cached_and_recorded(tiny_model_dir):
    again = build_local_model(LocalModelSpec.tiny(), progress=False)
    assert again == tiny_model_dir
    meta = read_metadata(tiny_model_dir)
    assert meta["spec"]["d_model"] == 32
    assert meta["held_out_ce"] > 0 and meta["build_seconds"] > 0
    # better than uniform guessing over the vocabulary: it learned something
    assert meta["held_out_ce"] < meta["ln_vocab"]
    assert json.loads((tiny_model_dir / METADATA).read_text()) == meta


def test_loaded_model_is_gpt_neox_shaped(tiny_model):
    cfg = tiny_model.cfg
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads) == (32, 2, 4)
    assert not tiny_model.training
    assert tiny_model.tokenizer.bos_token_id == 0


def test_stopped_run_matches_full_run(tiny_model):
    tokens = torch.randint(1, 500, (2, 16))
    hook = "blocks.0.hook_resid_post"
    stopped = hook_activations(tiny_model, tokens, hook)
    _, cache = tiny_model.run_with_cache(tokens, names_filter=hook)
    torch.testing.assert_close(stopped, cache[hook])
    assert stopped.shape == (2, 16, 32)


def test_check_hook_lists_close_matches(tiny_model):
    assert check_hook(tiny_model, "blocks.1.hook_resid_post") == "blocks.1.hook_resid_post"
    with pytest.raises(ValueError, match="close matches.*blocks.0.hook_resid_post"):
        check_hook(tiny_model, "blocks.0.hook_resid_pots")


def test_hook_layer_and_stop_layer(tiny_model):
    assert hook_layer("blocks.3.hook_resid_post") == 3
    assert hook_layer("blocks.11.attn.hook_z") == 11
    assert hook_layer("hook_embed") == -1
    with pytest.raises(ValueError):
        hook_layer("ln_final.hook_normalized")
    assert stop_layer(tiny_model, "blocks.0.hook_resid_post") == 1
    assert stop_layer(tiny_model, "blocks.1.hook_resid_post") is None  # last block: full run


def test_missing_model_gives_value_error(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="cannot load model"):
        load_model("no-such-org/no-such-model-raysae")


def test_bad_spec_rejected():
    with pytest.raises(ValueError, match="divisible"):
        build_local_model(LocalModelSpec(d_model=30, n_heads=4))


def test_model_predicts_heldout_text_better_than_random(tiny_model_dir):
    from transformers import GPTNeoXForCausalLM, PreTrainedTokenizerFast

    from raysae.lm.local_model import mean_ce

    tok = PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)
    blocks = corpus.heldout_blocks(tok, 32, max_blocks=8)
    trained = GPTNeoXForCausalLM.from_pretrained(tiny_model_dir)
    rand = GPTNeoXForCausalLM(trained.config)
    assert mean_ce(trained, blocks) < mean_ce(rand, blocks) - 0.5
    assert np.all(blocks[:, 0] == tok.bos_token_id)


@pytest.mark.slow
def test_default_local_model_models_language():
    """The default local model (minutes to build): held-out CE <= 60% of ln(vocab)."""
    meta = read_metadata(build_local_model(progress=False))
    assert meta["ce_over_ln_vocab"] <= 0.6
    assert meta["heldout_blocks"] == LocalModelSpec().eval_blocks
