"""A random-weight checkpoint with Pythia-70M-deduped's exact architecture, built offline.

`build_pythia70m_checkpoint(folder)` writes what a hub snapshot of
EleutherAI/pythia-70m-deduped holds, with random weights: `config.json` with the hub's own
fields and spelling (`rotary_pct`, `rotary_emb_base`: transformers 5 reads them into
`rope_parameters`), float16 `model.safetensors` of a `GPTNeoXForCausalLM` built from that
config, and a tokenizer. The tokenizer is a byte-level BPE trained on the stdlib corpus
(raysae's own `train_tokenizer`, as the local model's); its 4096 ids, with `<|endoftext|>`
= 0 as Pythia's, fit the 50304 rows of the embedding. The folder is what `--model <folder>`
takes, so the `pythia-70m` preset can be rehearsed end to end without the model hub.
"""

from __future__ import annotations

import json
from pathlib import Path

PYTHIA_70M_CONFIG = {
    "architectures": ["GPTNeoXForCausalLM"],
    "bos_token_id": 0,
    "eos_token_id": 0,
    "hidden_act": "gelu",
    "hidden_size": 512,
    "initializer_range": 0.02,
    "intermediate_size": 2048,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "model_type": "gpt_neox",
    "num_attention_heads": 8,
    "num_hidden_layers": 6,
    "rotary_emb_base": 10000,
    "rotary_pct": 0.25,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.24.0",
    "use_cache": True,
    "use_parallel_residual": True,
    "vocab_size": 50304,
}
"""EleutherAI/pythia-70m-deduped's config.json on the hub, field for field."""

TOKENIZER_VOCAB = 4096
TOKENIZER_DOCS = 200  # stdlib files the tokenizer learns from (a few seconds)


def build_pythia70m_checkpoint(folder: str | Path, seed: int = 0) -> Path:
    """Write the random-weight Pythia-70M-deduped-shaped checkpoint into `folder` (~10 s)."""
    import torch
    from transformers import AutoConfig, GPTNeoXForCausalLM

    from raysae.lm.local_model import LocalModelSpec, train_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hub_config = json.dumps(PYTHIA_70M_CONFIG, indent=2) + "\n"
    (folder / "config.json").write_text(hub_config)
    config = AutoConfig.from_pretrained(folder)  # read as transformers reads the hub's file
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config).to(torch.float16).eval()
    model.save_pretrained(folder)
    (folder / "config.json").write_text(hub_config)  # save_pretrained rewrote it in v5 terms
    tok = train_tokenizer(LocalModelSpec(vocab_size=TOKENIZER_VOCAB,
                                         tokenizer_docs=TOKENIZER_DOCS))
    if len(tok) > PYTHIA_70M_CONFIG["vocab_size"]:
        raise AssertionError(f"tokenizer has {len(tok)} ids, more than the embedding's rows")
    tok.save_pretrained(folder)
    return folder
