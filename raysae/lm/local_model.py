"""A small GPT-NeoX (Pythia's architecture) trained here, for machines without the model hub.

`build_local_model(spec)` trains a byte-level BPE tokenizer and the model on the train split
of a local corpus (the stdlib's .py files by default; see `raysae.lm.corpus`), saves an HF
checkpoint + tokenizer + `raysae_model.json` (spec, build time, held-out CE) and caches it
under `<cache>/models/<hash of the spec>`, so the second call returns at once. The checkpoint
loads through the same `raysae.lm.models.load_model` path as a hub model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from tqdm.auto import tqdm

from raysae.lm import corpus

METADATA = "raysae_model.json"
FORMAT_VERSION = 2  # 2: the stdlib read in corpus.STDLIB_ORDER, not alphabetically
SPECIAL = "<|endoftext|>"


def cache_dir() -> Path:
    """raysae's cache root: $RAYSAE_CACHE_DIR, else ~/.cache/raysae (XDG_CACHE_HOME honoured)."""
    env = os.environ.get("RAYSAE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "raysae"


@dataclass(frozen=True)
class LocalModelSpec:
    """Everything that determines the local model; its hash names the cache folder."""

    source: str | tuple[str, ...] = corpus.STDLIB  # "stdlib" or local text files/folders
    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 512
    context_length: int = 128
    rotary_pct: float = 0.25  # Pythia rotates a quarter of each head's dims
    train_steps: int = 500
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    seed: int = 0
    max_train_blocks: int | None = None  # cap on training blocks (None: the whole train split)
    eval_blocks: int = 128  # held-out blocks for the recorded CE
    tokenizer_docs: int | None = None  # documents the tokenizer learns from (None: all)

    @classmethod
    def tiny(cls) -> LocalModelSpec:
        """A model built in seconds, for tests: 2 layers, d_model 32, a 512-token vocabulary."""
        return cls(vocab_size=512, d_model=32, n_layers=2, n_heads=4, d_mlp=128,
                   context_length=32, train_steps=30, batch_size=16, lr=1e-2, warmup_steps=5,
                   max_train_blocks=2000, eval_blocks=32, tokenizer_docs=40)

    def settings_hash(self) -> str:
        blob = json.dumps({"v": FORMAT_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_local_model(spec: LocalModelSpec | None = None, *, progress: bool = True) -> Path:
    """Return the checkpoint folder for `spec`, training and caching it on first use."""
    spec = spec or LocalModelSpec()
    _validate(spec)
    root = cache_dir() / "models"
    final = root / spec.settings_hash()
    if (final / METADATA).exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / METADATA).exists():  # built by another process while we waited
            return final
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        _build_into(spec, tmp, progress)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    return final


def default_model(progress: bool = True) -> Path:
    """The default local model's checkpoint folder (built on first use, minutes on 2 cores)."""
    return build_local_model(LocalModelSpec(), progress=progress)


def read_metadata(model_dir: str | os.PathLike) -> dict:
    return json.loads((Path(model_dir) / METADATA).read_text())


def _validate(spec: LocalModelSpec) -> None:
    if spec.d_model % spec.n_heads:
        raise ValueError(f"d_model={spec.d_model} must be divisible by n_heads={spec.n_heads}")
    if spec.vocab_size < 300:
        raise ValueError(f"vocab_size={spec.vocab_size} must be >= 300 (256 bytes + merges)")
    for name in ("train_steps", "batch_size", "context_length", "eval_blocks"):
        if getattr(spec, name) < 1:
            raise ValueError(f"{name}={getattr(spec, name)} must be >= 1")


def train_tokenizer(spec: LocalModelSpec):
    """A byte-level BPE tokenizer (GPT-NeoX style) trained on the train split only."""
    # on use: only building the local model trains a tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size, special_tokens=[SPECIAL], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = corpus.iter_texts(spec.source, split="train")
    tok.train_from_iterator(itertools.islice(texts, spec.tokenizer_docs), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, unk_token=SPECIAL,
        pad_token=SPECIAL,
    )


def _make_model(spec: LocalModelSpec, vocab_size: int):
    # on use: only building the local model needs the HF model classes
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=spec.d_model, num_hidden_layers=spec.n_layers,
        num_attention_heads=spec.n_heads, intermediate_size=spec.d_mlp,
        max_position_embeddings=spec.context_length, use_parallel_residual=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": spec.rotary_pct},
        bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
    )
    return GPTNeoXForCausalLM(config)


@torch.no_grad()
def mean_ce(model, blocks: np.ndarray, batch_size: int = 32) -> float:
    """Mean next-token CE (nats) of an HF causal LM over token blocks."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = torch.as_tensor(blocks[i : i + batch_size])
        loss = model(input_ids=ids, labels=ids).loss
        n = ids.shape[0] * (ids.shape[1] - 1)
        total, count = total + float(loss) * n, count + n
    return total / count


def _train(model, blocks: np.ndarray, spec: LocalModelSpec, progress: bool) -> None:
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay,
                            betas=(0.9, 0.95))

    def lr_factor(step: int) -> float:  # linear warmup then cosine to 10%
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        frac = (step - spec.warmup_steps) / max(1, spec.train_steps - spec.warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    data = torch.as_tensor(blocks)
    model.train()
    bar = tqdm(range(spec.train_steps), desc="training local model", disable=not progress)
    for _ in bar:
        ids = data[torch.randint(len(data), (spec.batch_size,), generator=gen)]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()


def _build_into(spec: LocalModelSpec, out: Path, progress: bool) -> None:
    """Train tokenizer + model into `out`; record CE and timings (wall and CPU seconds, as a
    shared machine can stretch wall time) in the metadata."""
    start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(spec.seed)
    tok = train_tokenizer(spec)
    train = corpus.token_blocks(spec.source, tok, spec.context_length, split="train",
                                max_blocks=spec.max_train_blocks)
    held = corpus.token_blocks(spec.source, tok, spec.context_length, split="heldout",
                               max_blocks=spec.eval_blocks)
    tokenize_seconds = time.perf_counter() - start
    model = _make_model(spec, len(tok))
    _train(model, train, spec, progress)
    ce = mean_ce(model, held)
    build_seconds = time.perf_counter() - start
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    meta = {
        "format_version": FORMAT_VERSION, "settings_hash": spec.settings_hash(),
        "spec": dataclasses.asdict(spec), "build_seconds": round(build_seconds, 2),
        "tokenize_seconds": round(tokenize_seconds, 2),
        "build_cpu_seconds": round(time.process_time() - cpu_start, 2),
        "held_out_ce": ce, "ln_vocab": math.log(len(tok)),
        "ce_over_ln_vocab": ce / math.log(len(tok)),
        "train_blocks": len(train), "heldout_blocks": len(held),
        "train_tokens_seen": spec.train_steps * spec.batch_size * spec.context_length,
        "n_params": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / METADATA).write_text(json.dumps(meta, indent=2))
