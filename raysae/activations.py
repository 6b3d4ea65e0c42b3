"""Activations of an LM hook, harvested with Ray Data, and a shuffled batch reader.

    token blocks -> map_batches(Harvester) on an actor pool (LM run only up to the hooked
    layer, one GPU per actor when there are GPUs) -> rows {block_id, pos, token, act}

`iter_activation_batches` yields shuffled float32 torch batches [batch, d_in] from either an
activation cache folder (see `raysae.activation_cache`) or straight from the live pipeline
(an `ActivationSource`), with the same interface, so a trial can train without a cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raysae import corpus
from raysae.models import DEFAULT_HOOK

DTYPES = ("float32", "float16", "bfloat16")
# Fields that decide the data itself; the others only change how fast it is made.
CONTENT_FIELDS = ("hook", "dataset", "split", "text_column", "context_length", "n_tokens",
                  "dtype", "drop_bos", "prepend_bos")


@dataclass(frozen=True)
class ActivationSource:
    """What to harvest (model, hook, text, how many tokens) and how (batching, actors)."""

    model: str  # hub name, local checkpoint folder, or "local" / "local-tiny"
    hook: str = DEFAULT_HOOK
    dataset: str = corpus.STDLIB  # a `raysae.corpus` source
    split: str = "train"  # corpus split: train / heldout / all
    text_column: str = "text"
    context_length: int = 128
    n_tokens: int = 1_000_000  # activation rows (BOS rows excluded when drop_bos)
    dtype: str = "float32"  # storage dtype: float32 / float16 / bfloat16
    drop_bos: bool = True  # drop the BOS position (its activation is an outlier)
    prepend_bos: bool = True
    batch_blocks: int = 32  # token blocks per LM forward
    num_actors: int | None = None  # actor pool size; None: one per GPU, else one per CPU
    cpus_per_actor: float = 1.0
    shard_rows: int = 65_536  # rows per Parquet shard of the cache

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
        blob = json.dumps(self.cache_settings(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def replace(self, **changes) -> ActivationSource:
        return dataclasses.replace(self, **changes)


def _dataset_id(dataset) -> str:
    """A machine-independent name for the corpus (local paths by file name only)."""
    if isinstance(dataset, str) and (dataset == corpus.STDLIB or not os.path.exists(dataset)):
        return dataset
    return "local:" + os.path.basename(os.path.normpath(os.fspath(dataset)))


def model_fingerprint(model: str) -> str:
    """Hub name as is; a local checkpoint by its build hash or its config + weight sizes."""
    from raysae.models import resolve_model

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
    """The int32 token blocks [n_blocks, context_length] that `src` harvests."""
    from transformers import AutoTokenizer

    from raysae.models import resolve_model

    tok = AutoTokenizer.from_pretrained(os.path.expanduser(resolve_model(src.model)))
    blocks = corpus.token_blocks(src.dataset, tok, src.context_length, text_column=src.text_column,
                                 prepend_bos=src.prepend_bos, max_blocks=src.n_blocks,
                                 split=src.split)
    if len(blocks) < src.n_blocks:
        have = len(blocks) * src.tokens_per_block
        raise ValueError(f"n_tokens={src.n_tokens} but dataset {src.dataset!r} split "
                         f"{src.split!r} holds only {have} tokens; lower n_tokens or add text")
    return blocks.astype(np.int32)


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


class Harvester:
    """Ray Data callable class: token blocks -> activation rows (model loaded once per actor)."""

    def __init__(self, src: ActivationSource):
        from raysae.models import load_model, stop_layer

        self.src = src
        self.model = load_model(src.model)
        self.stop = stop_layer(self.model, src.hook)

    def __call__(self, batch: dict) -> dict:
        from raysae.models import hook_activations

        src = self.src
        tokens = torch.from_numpy(np.array(batch["tokens"], dtype=np.int64))
        acts = hook_activations(self.model, tokens, src.hook, stop=self.stop)
        start = int(src.bos_dropped)
        n, ctx = tokens.shape
        pos = np.arange(start, ctx)
        block_id = np.repeat(np.asarray(batch["block_id"], dtype=np.int64), ctx - start)
        pos = np.tile(pos, n)
        keep = block_id * src.tokens_per_block + (pos - start) < src.n_tokens
        flat = acts[:, start:].reshape(-1, acts.shape[-1])[torch.from_numpy(keep)]
        return {"block_id": block_id[keep], "pos": pos[keep].astype(np.int16),
                "token": tokens[:, start:].reshape(-1).numpy()[keep].astype(np.int32),
                "act": to_storage(flat, src.dtype)}


def harvest_dataset(src: ActivationSource, blocks: np.ndarray, block_ids: np.ndarray):
    """The lazy Ray Dataset of activation rows for the given blocks."""
    import pyarrow as pa
    import ray
    from ray.data.extensions import ArrowTensorArray

    if not ray.is_initialized():
        ray.init()
    ray.data.DataContext.get_current().enable_progress_bars = False  # callers show their own
    gpus = ray.cluster_resources().get("GPU", 0)
    cpus = ray.cluster_resources().get("CPU", 1)
    size = src.num_actors or (int(gpus) if gpus else max(1, int(cpus // src.cpus_per_actor)))
    step = src.batch_blocks
    tables = [pa.table({"block_id": block_ids[i : i + step],
                        "tokens": ArrowTensorArray.from_numpy(blocks[i : i + step])})
              for i in range(0, len(blocks), step)]
    ds = ray.data.from_arrow(tables)
    return ds.map_batches(
        Harvester, fn_constructor_kwargs={"src": src}, batch_size=step, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=size), num_gpus=1 if gpus else 0,
        num_cpus=src.cpus_per_actor,
    )


def iter_harvest(src: ActivationSource, blocks: np.ndarray | None = None,
                 skip_blocks: set[int] | None = None) -> Iterator[dict]:
    """Run the pipeline; yield its output batches (each holds whole blocks) as numpy dicts."""
    blocks = source_blocks(src) if blocks is None else blocks
    ids = np.arange(len(blocks))
    if skip_blocks:
        ids = ids[~np.isin(ids, np.fromiter(skip_blocks, dtype=np.int64))]
    if len(ids) == 0:
        return
    ds = harvest_dataset(src, blocks[ids], ids)
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def shuffled_batches(chunks: Callable[[int], Iterator[np.ndarray]], batch_size: int,
                     n_tokens: int, shuffle_buffer: int, seed: int) -> Iterator[torch.Tensor]:
    """Mix row chunks (epoch by epoch, from `chunks(epoch)`) in a shuffle buffer; yield exactly
    `n_tokens` rows as float32 batches [batch_size, d] (only the last may be smaller)."""
    if batch_size < 1 or n_tokens < 1:
        raise ValueError(f"batch_size={batch_size} and n_tokens={n_tokens} must be >= 1")
    rng = np.random.default_rng(seed)
    pending: list[np.ndarray] = []
    left, size, epoch = n_tokens, 0, 0

    def emit(final: bool) -> list[np.ndarray]:
        nonlocal pending, size, left
        mixed = np.concatenate(pending)
        mixed = mixed[rng.permutation(len(mixed))]
        n_out = min(left, len(mixed))
        if not final:  # keep half a buffer back, to mix with the rows still to come
            n_out = min(left, (len(mixed) - shuffle_buffer // 2) // batch_size * batch_size)
        left, size, pending = left - n_out, len(mixed) - n_out, [mixed[n_out:]]
        return [mixed[i : min(i + batch_size, n_out)] for i in range(0, n_out, batch_size)]

    while left > 0:
        seen = 0
        for chunk in chunks(epoch):
            pending.append(chunk)
            size, seen = size + len(chunk), seen + len(chunk)
            if size >= shuffle_buffer + batch_size:
                for batch in emit(final=False):
                    yield torch.from_numpy(np.ascontiguousarray(batch))
                if left == 0:
                    return
        if seen == 0:
            raise ValueError("the activation source yielded no rows; check its n_tokens / cache")
        epoch += 1
        if size >= left:  # every row still owed is in the buffer
            for batch in emit(final=True):
                yield torch.from_numpy(np.ascontiguousarray(batch))


def iter_activation_batches(source: ActivationSource | str | os.PathLike, batch_size: int, *,
                            n_tokens: int | None = None, shuffle_buffer: int = 32_768,
                            seed: int = 0, expect: ActivationSource | None = None,
                            ) -> Iterator[torch.Tensor]:
    """Shuffled float32 batches [batch_size, d_in] from a cache folder or a live source.

    `n_tokens` rows in all (default: one pass); more than the source holds loops over it
    again (the live pipeline re-runs each epoch). `seed` fixes the order.
    `expect` (cache only) refuses a cache built with other settings.
    """
    if isinstance(source, ActivationSource):
        total = source.n_tokens

        def chunks(epoch: int) -> Iterator[np.ndarray]:
            for batch in iter_harvest(source):
                yield from_storage(np.asarray(batch["act"]), source.dtype)
    else:
        from raysae.activation_cache import iter_cache_chunks, open_cache

        manifest = open_cache(source, expect)
        total = manifest["n_tokens"]

        def chunks(epoch: int) -> Iterator[np.ndarray]:
            yield from iter_cache_chunks(source, manifest, seed=seed + epoch)
    return shuffled_batches(chunks, batch_size, n_tokens or total, shuffle_buffer, seed)
