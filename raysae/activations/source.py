"""What to harvest: an LM hook's activations over a corpus (the ActivationSource), its
token blocks, and the storage dtypes. The data flow:

    token blocks -> map_batches(Harvester) on an actor pool (LM run only up to the hooked
    layer, one GPU per actor when there are GPUs) -> rows {block_id, pos, token, act}

`iter_activation_batches` yields shuffled torch batches [batch, d_in] from either an
activation cache folder (see `raysae.activations.cache`; batches in the stored dtype) or
straight from the live pipeline (an `ActivationSource`; float32), with the same interface, so
a trial can train without a cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch

from raysae.lm import corpus
from raysae.lm.models import DEFAULT_HOOK, resolve_model

CacheDtype = Literal["float32", "float16", "bfloat16"]
"""The activation cache's storage dtypes."""
DTYPES = get_args(CacheDtype)
# The activation cache's on-disk format; part of the cache key, so a format change rebuilds.
FORMAT_VERSION = 2
HARVEST_ORDER = "blocks-permuted"
"""Caches are harvested in a random order of the corpus's blocks (``harvest_order``), so each
shard is a sample of the whole corpus: read in corpus order, each shard held one stretch of
it, and the reader's shard windows made the training stream drift (the default search with
a 16-shard cache: held-out L0 16-28% over target for every seed whose last window differed).
Part of the cache key: caches harvested in corpus order are rebuilt, not reused."""
# Fields that decide the data itself; the others only change how fast it is made.
CONTENT_FIELDS = ("hook", "dataset", "split", "text_column", "context_length", "n_tokens",
                  "dtype", "drop_bos", "prepend_bos")


@dataclass(frozen=True)
class ActivationSource:
    """What to harvest (model, hook, text, how many tokens) and how (batching, actors)."""

    model: str  # hub name, local checkpoint folder, or "local" / "local-tiny"
    hook: str = DEFAULT_HOOK
    dataset: str = corpus.STDLIB  # a `raysae.lm.corpus` source
    split: str = "train"  # corpus split: train / heldout / all
    text_column: str = "text"
    context_length: int = 128
    n_tokens: int = 1_000_000  # activation rows (BOS rows excluded when drop_bos)
    dtype: CacheDtype = "float32"  # storage dtype
    drop_bos: bool = True  # drop the BOS position (its activation is an outlier)
    prepend_bos: bool = True
    batch_blocks: int = 32  # token blocks per LM forward
    num_actors: int | None = None  # actor pool size; None: one per GPU, else one per CPU
    cpus_per_actor: float = 1.0
    shard_rows: int = 65_536  # rows per shard (.npy file) of the cache

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {DTYPES}")
        if self.split not in corpus.SPLITS:
            raise ValueError(f"split={self.split!r} is not one of {corpus.SPLITS}")
        for name in ("n_tokens", "batch_blocks", "shard_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.context_length < 2:
            raise ValueError(f"context_length={self.context_length} must be >= 2")

    @property
    def bos_dropped(self) -> bool:
        return self.drop_bos and self.prepend_bos

    @property
    def tokens_per_block(self) -> int:
        return self.context_length - int(self.bos_dropped)

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.n_tokens / self.tokens_per_block)

    def cache_settings(self) -> dict:
        """The settings a cache is keyed by and checked against."""
        out = {k: getattr(self, k) for k in CONTENT_FIELDS}
        out["dataset"] = _dataset_id(self.dataset)
        return {"model": model_fingerprint(self.model), **out}

    def cache_key(self) -> str:
        blob = json.dumps({"format_version": FORMAT_VERSION, "order": HARVEST_ORDER,
                           "stdlib_order": corpus.STDLIB_ORDER,
                           **self.cache_settings()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _dataset_id(dataset) -> str:
    """A machine-independent name for the corpus (local paths by file name only)."""
    if isinstance(dataset, str) and (dataset == corpus.STDLIB or not os.path.exists(dataset)):
        return dataset
    return "local:" + os.path.basename(os.path.normpath(os.fspath(dataset)))


def model_fingerprint(model: str) -> str:
    """Hub name as is; a local checkpoint by its build hash or its config + weight sizes."""
    path = Path(os.path.expanduser(resolve_model(model)))
    if not path.is_dir():
        return model
    meta = path / "raysae_model.json"
    if meta.exists():
        return "local:" + json.loads(meta.read_text())["settings_hash"]
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return "local:" + digest.hexdigest()[:16]


def source_blocks(src: ActivationSource) -> np.ndarray:
    """The int32 token blocks [n_blocks, context_length] that `src` harvests (a cache's, and
    a live stream's first epoch)."""
    return next(source_block_stream(src))


def source_block_stream(src: ActivationSource) -> Iterator[np.ndarray]:
    """Epoch after epoch, the int32 blocks [n_blocks, context_length] a live stream harvests:
    each time the corpus's next n_blocks (fresh tokens), starting the corpus over when it
    ends. The corpus is tokenized as it is read, once per pass, never again per epoch."""
    # on use: transformers (0.5 s to import) only when text is tokenized
    from transformers import AutoTokenizer


    tok = AutoTokenizer.from_pretrained(os.path.expanduser(resolve_model(src.model)))
    n = src.n_blocks

    def corpus_rows() -> Iterator[np.ndarray]:
        for arr in corpus.iter_token_blocks(src.dataset, tok, src.context_length,
                                            text_column=src.text_column,
                                            prepend_bos=src.prepend_bos, split=src.split):
            yield from arr

    rows, read = corpus_rows(), 0
    while True:
        epoch: list[np.ndarray] = []
        while len(epoch) < n:
            row = next(rows, None)
            if row is None:  # the corpus ended: start it over
                if read < n:  # not even one epoch in the whole corpus
                    have = read * src.tokens_per_block
                    raise ValueError(f"n_tokens={src.n_tokens} but dataset {src.dataset!r} "
                                     f"split {src.split!r} holds only {have} tokens; lower "
                                     "n_tokens or add text")
                rows = corpus_rows()
                continue
            read += 1
            epoch.append(row)
        yield np.stack(epoch).astype(np.int32)


def harvest_order(n_blocks: int, seed: int = 0) -> np.ndarray:
    """The order in which blocks are harvested: a fixed permutation (see HARVEST_ORDER)."""
    return np.random.default_rng([0x5AE, seed]).permutation(n_blocks)


def to_storage(acts: torch.Tensor, dtype: str) -> np.ndarray:
    """float tensor -> numpy in the storage dtype (bfloat16 kept as its raw uint16 bits)."""
    if dtype == "bfloat16":
        return acts.to(torch.bfloat16).view(torch.uint16).cpu().numpy()
    return acts.to(getattr(torch, dtype)).cpu().numpy()


def from_storage(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Stored activations -> float32 numpy."""
    if dtype == "bfloat16":
        return torch.from_numpy(arr.view(np.uint16).copy()).view(torch.bfloat16).float().numpy()
    return arr.astype(np.float32, copy=False)
