"""The activation cache: Parquet shards + manifest.json, keyed by a hash of the settings.

Layout: `<cache_root>/<key>/` holds `shard-00000.parquet`, ... and `manifest.json` (model,
hook, dataset, context length, token count, dtype, d_in, per-shard sha256, token-id
checksums, normalisation statistics). It is built in `<key>.partial/` and renamed when
complete. An interrupted build resumes: shards recorded in `progress.json` are kept and
their blocks are not harvested again; anything else there is deleted, so no row is written
twice. Every shard's checksum is checked when it is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from raysae import io
from raysae.activations.harvest import iter_harvest
from raysae.activations.source import ActivationSource, from_storage, source_blocks

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
FORMAT_VERSION = 1
_ARROW_DTYPE = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}


class CacheError(ValueError):
    """A cache that is corrupt or was built with other settings."""


def default_cache_root() -> Path:
    from raysae.lm.local_model import cache_dir

    return cache_dir() / "activations"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_shard(folder: Path, index: int, batches: list[dict], dtype: str,
                 origin: str = "the model") -> dict:
    """Write one shard (temp name, then rename); return its manifest entry with partial sums.
    Non-finite activations (a broken model) are refused, naming ``origin``, before writing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in batches[0]}
    act = cols["act"]
    x = from_storage(act, dtype)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        blocks = np.unique(cols["block_id"][~finite])
        raise CacheError(f"{origin} gives NaN/inf activations in {int((~finite).sum())} of "
                         f"{len(x)} rows (token blocks {blocks[:5].tolist()}...); check the "
                         "model's weights; nothing of them was cached")
    flat = pa.array(act.reshape(-1).view(_ARROW_DTYPE[dtype]))
    table = pa.table({"block_id": cols["block_id"], "pos": cols["pos"], "token": cols["token"],
                      "act": pa.FixedSizeListArray.from_arrays(flat, act.shape[1])})
    name = f"shard-{index:05d}.parquet"
    tmp = folder / (name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, folder / name)
    x = x.astype(np.float64)
    return {"file": name, "rows": len(act), "sha256": _sha256((folder / name).read_bytes()),
            "token_sha256": _sha256(np.ascontiguousarray(cols["token"]).tobytes()),
            "sum": x.sum(0).tolist(), "sum_sq_norm": float((x * x).sum())}


def _resume(partial: Path, tokens_sha256: str) -> list[dict]:
    """Shards of an earlier interrupted build of the same data; stray files are removed."""
    progress = partial / PROGRESS
    shards: list[dict] = []
    if progress.exists():
        state = json.loads(progress.read_text())
        if state.get("tokens_sha256") == tokens_sha256:
            shards = [s for s in state["shards"] if (partial / s["file"]).exists()]
    keep = {s["file"] for s in shards} | {PROGRESS}
    for path in partial.iterdir():
        if path.name not in keep:
            path.unlink()
    return shards


def _done_blocks(partial: Path, shards: list[dict]) -> set[int]:
    import pyarrow.parquet as pq

    done: set[int] = set()
    for s in shards:
        done.update(pq.read_table(partial / s["file"], columns=["block_id"])["block_id"]
                    .to_numpy().tolist())
    return done


def _whole_blocks(src: ActivationSource, batches: list[dict]) -> bool:
    """Whether every block in `batches` is complete, so a shard never splits a block (resume
    skips blocks found in finished shards)."""
    ids, counts = np.unique(np.concatenate([b["block_id"] for b in batches]), return_counts=True)
    last = src.n_tokens - (src.n_blocks - 1) * src.tokens_per_block
    return bool(np.all(counts == np.where(ids == src.n_blocks - 1, last, src.tokens_per_block)))


def _stats(shards: list[dict], d_in: int) -> dict:
    rows = sum(s["rows"] for s in shards)
    total = np.sum([s["sum"] for s in shards], axis=0) if shards else np.zeros(d_in)
    mean = total / max(rows, 1)
    mean_sq_norm = sum(s["sum_sq_norm"] for s in shards) / max(rows, 1)
    return {"mean_sq_norm": mean_sq_norm, "variance": mean_sq_norm - float(mean @ mean),
            "mean": mean.tolist()}


def _harvest_into(src: ActivationSource, partial: Path, blocks: np.ndarray,
                  tokens_sha256: str, progress: bool) -> list[dict]:
    from tqdm.auto import tqdm

    shards = _resume(partial, tokens_sha256)
    bar = tqdm(total=src.n_tokens, initial=sum(s["rows"] for s in shards), unit="tok",
               desc="activations", disable=not progress, smoothing=0.1)
    pending, rows = [], 0
    done = _done_blocks(partial, shards)

    def flush():
        nonlocal pending, rows
        shards.append(_write_shard(partial, len(shards), pending, src.dtype,
                                   f"model {src.model} at hook {src.hook}"))
        io.write_json(partial / PROGRESS, {"tokens_sha256": tokens_sha256, "shards": shards})
        pending, rows = [], 0

    with bar:  # closed (its line ended) before any error is printed
        for batch in iter_harvest(src, blocks, skip_blocks=done):
            pending.append(batch)
            rows += len(batch["act"])
            bar.update(len(batch["act"]))
            if rows >= src.shard_rows and _whole_blocks(src, pending):
                flush()
        if pending:
            flush()
    return shards


def build_cache(src: ActivationSource, cache_root: str | os.PathLike | None = None, *,
                progress: bool = True) -> Path:
    """Build (or find) the cache for `src`; return its folder. Resumes an interrupted build."""
    from filelock import FileLock

    root = Path(cache_root) if cache_root else default_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    key = src.cache_key()
    final, partial = root / key, root / f"{key}.partial"
    with FileLock(str(root / f"{key}.lock")):
        if (final / MANIFEST).exists():
            open_cache(final, src)
            return final
        start = time.perf_counter()
        blocks = source_blocks(src)
        tokens_sha256 = _sha256(blocks.tobytes())
        partial.mkdir(exist_ok=True)
        shards = _harvest_into(src, partial, blocks, tokens_sha256, progress)
        rows = sum(s["rows"] for s in shards)
        if rows != src.n_tokens:
            raise CacheError(f"harvest gave {rows} rows, expected n_tokens={src.n_tokens}; "
                             f"delete {partial} and rebuild")
        d_in = len(shards[0]["sum"])
        manifest = {
            "format_version": FORMAT_VERSION, "key": key, "settings": src.cache_settings(),
            "model": src.model, "hook": src.hook, "dataset": src.dataset, "split": src.split,
            "context_length": src.context_length, "n_tokens": rows, "dtype": src.dtype,
            "d_in": d_in, "drop_bos": src.drop_bos, "n_blocks": len(blocks),
            "tokens_sha256": tokens_sha256, "stats": _stats(shards, d_in),
            "shards": [{k: v for k, v in s.items() if k != "sum"} for s in shards],
            "build_seconds": round(time.perf_counter() - start, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        io.write_json(partial / MANIFEST, manifest)
        (partial / PROGRESS).unlink()
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    return final


def load_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a cache folder (or of the manifest file itself)."""
    path = Path(path)
    file = path / MANIFEST if path.is_dir() else path
    if not file.exists():
        raise CacheError(f"{path} has no {MANIFEST}: not a finished activation cache; build it")
    return json.loads(file.read_text())


def open_cache(path: str | os.PathLike, expect: ActivationSource | None = None) -> dict:
    """The manifest, after checking it matches `expect`'s settings (when given)."""
    manifest = load_manifest(path)
    if expect is not None and manifest["settings"] != expect.cache_settings():
        want, have = expect.cache_settings(), manifest["settings"]
        diff = {k: (have.get(k), want.get(k)) for k in want if have.get(k) != want.get(k)}
        raise CacheError(f"cache {path} was built with other settings (have, want): {diff}; "
                         "build a cache for these settings")
    return manifest


def read_shard(path: str | os.PathLike, entry: dict, dtype: str) -> np.ndarray:
    """One shard's activations as float32 [rows, d_in], after checking its sha256."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = Path(path) / entry["file"]
    data = file.read_bytes()
    if _sha256(data) != entry["sha256"]:
        raise CacheError(f"shard {file} fails its checksum (corrupt or changed); rebuild the cache")
    col = pq.read_table(pa.BufferReader(data), columns=["act"])["act"].combine_chunks()
    flat = col.values.to_numpy(zero_copy_only=False)
    out = from_storage(flat.reshape(len(col), -1), dtype)
    if not np.isfinite(out).all():  # a shard re-written with a matching checksum, or bad RAM
        bad = int((~np.isfinite(out)).any(axis=1).sum())
        raise CacheError(f"shard {file} holds NaN/inf in {bad} of {len(out)} rows although its "
                         "checksum matches; rebuild the activation cache (and check the model)")
    return out


def verify_cache(path: str | os.PathLike) -> dict:
    """Check every shard's checksum and the row count; return the manifest."""
    manifest = load_manifest(path)
    rows = sum(len(read_shard(path, s, manifest["dtype"])) for s in manifest["shards"])
    if rows != manifest["n_tokens"]:
        raise CacheError(f"cache {path} holds {rows} rows, manifest says {manifest['n_tokens']}")
    return manifest


def iter_cache_chunks(path: str | os.PathLike, manifest: dict, *,
                      seed: int) -> Iterator[np.ndarray]:
    """The cache's shards as float32 arrays, in an order shuffled by `seed`."""
    order = np.random.default_rng(seed).permutation(len(manifest["shards"]))
    for i in order:
        yield read_shard(path, manifest["shards"][i], manifest["dtype"])
