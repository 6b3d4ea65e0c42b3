"""The activation cache: .npy shards + manifest.json, keyed by a hash of the settings and
the format version.

Layout: `<cache_root>/<key>/` holds `shard-00000.npy` + `shard-00000.meta.parquet`, ... (see
`raysae.activations.shards`) and `manifest.json` (format version, model, hook, dataset, context
length, token count, dtype, d_in, per-file sha256, token-id checksums, normalisation
statistics). It is built in `<key>.partial/` and renamed when complete. An interrupted build
resumes: shards recorded in `progress.json` are kept and their blocks are not harvested
again; anything else there is deleted, so no row is written twice. NaN/inf is refused when a
shard is written. Every file's checksum is checked when the cache is opened for reading
(`raysae.activations.batches`); `verify_cache` also checks finiteness and row counts.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from raysae import io
from raysae.activations.harvest import iter_harvest
from raysae.activations.shards import (
    CacheError,
    check_files,
    map_shard,
    nonfinite_rows,
    read_meta,
    read_shard,
    sha256_bytes,
    write_shard,
    write_stamp,
)
from raysae.activations.source import (
    FORMAT_VERSION,
    ActivationSource,
    harvest_order,
    source_blocks,
)
from raysae.lm.local_model import cache_dir

__all__ = ["FORMAT_VERSION", "MANIFEST", "PROGRESS", "CacheError", "build_cache",
           "load_manifest", "open_cache", "read_shard", "verify_cache", "write_arrays_cache"]
MANIFEST = "manifest.json"
PROGRESS = "progress.json"


def default_cache_root() -> Path:
    return cache_dir() / "activations"


def _resume(partial: Path, tokens_sha256: str) -> list[dict]:
    """Shards of an earlier interrupted build of the same data; stray files are removed."""
    progress = partial / PROGRESS
    shards: list[dict] = []
    if progress.exists():
        state = json.loads(progress.read_text())
        if state.get("tokens_sha256") == tokens_sha256:
            shards = [s for s in state["shards"]
                      if (partial / s["file"]).exists() and (partial / s["meta"]).exists()]
    keep = {name for s in shards for name in (s["file"], s["meta"])} | {PROGRESS}
    for path in partial.iterdir():
        if path.name not in keep:
            path.unlink()
    return shards


def _done_blocks(partial: Path, shards: list[dict]) -> set[int]:
    done: set[int] = set()
    for s in shards:
        done.update(np.unique(read_meta(partial, s, ("block_id",))["block_id"]).tolist())
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
                  tokens_sha256: str, progress: bool, in_process: bool = False) -> list[dict]:
    shards = _resume(partial, tokens_sha256)
    bar = tqdm(total=src.n_tokens, initial=sum(s["rows"] for s in shards), unit="tok",
               desc="activations", disable=not progress, smoothing=0.1)
    pending, rows = [], 0
    done = _done_blocks(partial, shards)

    def flush():
        nonlocal pending, rows
        shards.append(write_shard(partial, len(shards), pending, src.dtype,
                                  f"model {src.model} at hook {src.hook}"))
        io.write_json(partial / PROGRESS, {"tokens_sha256": tokens_sha256, "shards": shards})
        pending, rows = [], 0

    with bar:  # closed (its line ended) before any error is printed
        for batch in iter_harvest(src, blocks, skip_blocks=done, in_process=in_process,
                                  order=harvest_order(len(blocks))):
            pending.append(batch)
            rows += len(batch["act"])
            bar.update(len(batch["act"]))
            if rows >= src.shard_rows and _whole_blocks(src, pending):
                flush()
        if pending:
            flush()
    return shards


def build_cache(src: ActivationSource, cache_root: str | os.PathLike | None = None, *,
                progress: bool = True, in_process: bool = False,
                lock_timeout: float | None = None) -> Path:
    """Build (or find) the cache for `src`; return its folder. Resumes an interrupted build.
    One builder per folder (a file lock; others wait for it, at most ``lock_timeout``
    seconds, then fail naming the lock). ``in_process``: harvest on this process's own
    device, not with a Ray Data actor pool (what a trial on a cluster node does)."""
    root = Path(cache_root) if cache_root else default_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    key = src.cache_key()
    final, partial, lock = root / key, root / f"{key}.partial", root / f"{key}.lock"
    try:
        with FileLock(str(lock), timeout=-1 if lock_timeout is None else lock_timeout):
            return _build_locked(src, final, partial, progress, in_process)
    except Timeout:
        raise CacheError(f"waited {lock_timeout:g} s for another process building the cache "
                         f"{final} (lock {lock}); if no build is running on this node, delete "
                         "the lock file; for a longer build raise --cache-wait-seconds"
                         ) from None


def _build_locked(src: ActivationSource, final: Path, partial: Path, progress: bool,
              in_process: bool) -> Path:
    if (final / MANIFEST).exists():
        open_cache(final, src)
        return final
    start = time.perf_counter()
    blocks = source_blocks(src)
    tokens_sha256 = sha256_bytes(blocks.tobytes())
    partial.mkdir(exist_ok=True)
    shards = _harvest_into(src, partial, blocks, tokens_sha256, progress, in_process)
    rows = sum(s["rows"] for s in shards)
    if rows != src.n_tokens:
        raise CacheError(f"harvest gave {rows} rows, expected n_tokens={src.n_tokens}; "
                         f"delete {partial} and rebuild")
    _finish(partial, final, shards, {
        "key": final.name, "settings": src.cache_settings(), "model": src.model,
        "hook": src.hook, "dataset": src.dataset, "split": src.split,
        "context_length": src.context_length, "n_tokens": rows, "dtype": src.dtype,
        "drop_bos": src.drop_bos, "n_blocks": len(blocks), "tokens_sha256": tokens_sha256,
        "build_seconds": round(time.perf_counter() - start, 2)})
    return final


def _finish(partial: Path, final: Path, shards: list[dict], fields: dict) -> None:
    """Write the manifest into the finished `partial` folder and publish it as `final`."""
    d_in = len(shards[0]["sum"])
    manifest = {"format_version": FORMAT_VERSION, **fields, "d_in": d_in,
                "stats": _stats(shards, d_in),
                "shards": [{k: v for k, v in s.items() if k != "sum"} for s in shards],
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    io.write_json(partial / MANIFEST, manifest)
    (partial / PROGRESS).unlink(missing_ok=True)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    write_stamp(final, manifest["shards"])  # hashed while written: verified on this node


def write_arrays_cache(folder: str | os.PathLike, acts: np.ndarray, dtype: str, *,
                       shard_rows: int = 65_536, tokens_per_block: int = 128) -> Path:
    """A cache of given activations ([rows, d_in], in the storage dtype of `dtype`) written
    by the same shard writer as `build_cache` (for benchmarks and tests; the token ids are
    synthetic: block_id = row // tokens_per_block, pos and token = row % tokens_per_block)."""
    final = Path(folder)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    row = np.arange(len(acts))
    step = -(-shard_rows // tokens_per_block) * tokens_per_block  # whole blocks per shard
    shards = [write_shard(partial, i // step, [{
        "block_id": row[i : i + step] // tokens_per_block,
        "pos": (row[i : i + step] % tokens_per_block).astype(np.int16),
        "token": (row[i : i + step] % tokens_per_block).astype(np.int32),
        "act": acts[i : i + step]}], dtype) for i in range(0, len(acts), step)]
    _finish(partial, final, shards, {
        "key": final.name, "settings": {"model": "synthetic", "dtype": dtype},
        "model": "synthetic", "hook": None, "context_length": tokens_per_block,
        "n_tokens": len(acts), "dtype": dtype, "n_blocks": -(-len(acts) // tokens_per_block)})
    return final


def _rebuild_command(path: Path, manifest: dict) -> str:
    """The `raysae cache` command that builds a current cache for an old manifest's data."""
    args = [("--model", manifest.get("model")), ("--hook", manifest.get("hook")),
            ("--dataset", manifest.get("dataset")), ("--split", manifest.get("split")),
            ("--context-length", manifest.get("context_length")),
            ("--n-tokens", manifest.get("n_tokens")), ("--dtype", manifest.get("dtype"))]
    text_column = manifest.get("settings", {}).get("text_column", "text")
    words = [f"{flag} {value}" for flag, value in args if value is not None]
    words += [f"--text-column {text_column}"] * (text_column != "text")
    words += ["--keep-bos"] * (manifest.get("drop_bos") is False)
    return " ".join(["raysae cache", *words, f"--cache-root {path.parent}"])


def load_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a cache folder (or of the manifest file itself); a cache written in
    another format is refused with the command that rebuilds it."""
    path = Path(path)
    file = path / MANIFEST if path.is_dir() else path
    if not file.exists():
        raise CacheError(f"{path} has no {MANIFEST}: not a finished activation cache; build it")
    manifest = json.loads(file.read_text())
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        folder = file.parent
        age = "an older" if isinstance(version, int) and version < FORMAT_VERSION else "another"
        raise CacheError(f"cache {folder} was built by {age} raysae (format {version}); "
                         f"rebuild it with `{_rebuild_command(folder, manifest)}` (this raysae "
                         f"reads format {FORMAT_VERSION}; the new cache gets its own folder, "
                         "this one can be deleted)")
    return manifest


def open_cache(path: str | os.PathLike, expect: ActivationSource | None = None) -> dict:
    """The manifest, after checking it matches `expect`'s settings (when given)."""
    manifest = load_manifest(path)
    if expect is not None and manifest["settings"] != expect.cache_settings():
        want, have = expect.cache_settings(), manifest["settings"]
        diff = {k: (have.get(k), want.get(k)) for k in want if have.get(k) != want.get(k)}
        raise CacheError(f"cache {path} was built with other settings (have, want): {diff}; "
                         "build a cache for these settings")
    return manifest


def open_for_reading(path: str | os.PathLike, expect: ActivationSource | None = None) -> dict:
    """`open_cache`, then every shard file's checksum (once per process and file version)."""
    manifest = open_cache(path, expect)
    check_files(path, manifest["shards"])
    return manifest


def verify_cache(path: str | os.PathLike) -> dict:
    """Re-check every file's checksum, each shard's shape, rows, token checksum and
    finiteness, and the total row count; return the manifest."""
    manifest = load_manifest(path)
    check_files(path, manifest["shards"], memo=False)
    rows = 0
    for entry in manifest["shards"]:
        file = Path(path) / entry["file"]
        arr = map_shard(path, entry, manifest["dtype"], manifest["d_in"])
        tokens = read_meta(path, entry, ("token",))["token"]
        if len(tokens) != len(arr):
            raise CacheError(f"shard {file} has {len(arr)} rows but its metadata "
                             f"{entry['meta']} has {len(tokens)}; rebuild the cache")
        if sha256_bytes(tokens.astype(np.int32).tobytes()) != entry["token_sha256"]:
            raise CacheError(f"shard {file}: token ids do not match the manifest's "
                             "token_sha256; rebuild the cache")
        bad = nonfinite_rows(arr, manifest["dtype"])
        if bad:
            raise CacheError(f"shard {file} holds NaN/inf in {bad} of {len(arr)} rows although "
                             "its checksum matches; rebuild the activation cache (and check the "
                             "model)")
        rows += len(arr)
    if rows != manifest["n_tokens"]:
        raise CacheError(f"cache {path} holds {rows} rows, manifest says {manifest['n_tokens']}")
    return manifest
