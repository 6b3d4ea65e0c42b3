"""One cache shard on disk, and the checksums of a cache's files.

A shard is two files: ``shard-00000.npy``, the activations [rows, d_in] as a raw fixed-width
array in the storage dtype (float32, float16, or bfloat16 kept as its uint16 bits) that
memory-maps, and ``shard-00000.meta.parquet``, their block_id, pos and token in the same row
order. The rows are shuffled within the shard when it is written (a fixed permutation per
shard index), so any run of contiguous rows already mixes many contexts.

Checksums: `check_files` hashes every file of a cache in a thread pool (hashlib releases the
GIL) and remembers the digests of files it has seen, keyed by (path, size, mtime_ns): per
process, and per node in the cache folder's `.verified.json` stamp, so only the first
process on a node that opens a cache pays for hashing it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysae import io
from raysae.activations.source import from_storage
from raysae.settings import UserError

STORAGE_DTYPE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
META_COLUMNS = ("block_id", "pos", "token")
_CHUNK = 1 << 20
_DIGESTS: dict[tuple[str, int, int], str] = {}
_DIGESTS_LOCK = threading.Lock()


class CacheError(UserError):
    """A cache that is corrupt, was built with other settings, or by another raysae."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 1 MiB chunks (the GIL is released while hashing)."""
    digest, buf = hashlib.sha256(), bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _digest(path: Path, key: tuple[str, int, int]) -> str:
    digest = file_sha256(path)
    with _DIGESTS_LOCK:
        _DIGESTS[key] = digest
    return digest


def shard_files(entry: dict) -> list[tuple[str, str]]:
    """(file name, expected sha256) of each file of one manifest shard entry."""
    return [(entry["file"], entry["sha256"]), (entry["meta"], entry["meta_sha256"])]


VERIFIED_STAMP = ".verified.json"
"""In a cache folder: each file's (size, mtime_ns, sha256) as last verified on this node, so
every trial process after the first on a node skips re-hashing the cache (minutes per trial
for the pythia-70m preset's 411 GB: sha256 ran at 1.75 GB/s on one core here). A file whose
size or time changed is hashed again."""


def _read_stamp(folder: Path) -> dict:
    try:
        return json.loads((folder / VERIFIED_STAMP).read_text())
    except (OSError, ValueError):
        return {}


def write_stamp(folder: str | os.PathLike, shards: list[dict]) -> None:
    """Record every shard file of ``folder`` as verified (best effort: a read-only cache
    folder is verified by every process instead)."""
    folder = Path(folder)
    stamp = {}
    for entry in shards:
        for name, want in shard_files(entry):
            st = (folder / name).stat()
            stamp[name] = [st.st_size, st.st_mtime_ns, want]
    with contextlib.suppress(OSError):
        io.write_json(folder / VERIFIED_STAMP, stamp)


def check_files(folder: str | os.PathLike, shards: list[dict], *, memo: bool = True) -> None:
    """Check every shard file's sha256 against the manifest (all of them, in a thread pool);
    raise CacheError naming the first bad one, in manifest order. Files this process or this
    node (the folder's verified stamp) already checked, unchanged in size and time, are
    skipped; ``memo=False`` re-hashes everything."""
    folder = Path(folder)
    files = [(folder / name, want) for entry in shards for name, want in shard_files(entry)]
    for path, _ in files:
        if not path.is_file():
            raise CacheError(f"shard file {path} is missing; rebuild the cache")
    keys = [_stat_key(path) for path, _ in files]
    stamp = _read_stamp(folder) if memo else {}
    with _DIGESTS_LOCK:
        digests = [_DIGESTS.get(key) if memo else None for key in keys]
    for i, ((path, want), key) in enumerate(zip(files, keys)):
        if digests[i] is None and stamp.get(path.name) == [key[1], key[2], want]:
            digests[i] = want
    todo = [i for i, digest in enumerate(digests) if digest is None]
    if todo:
        workers = max(1, min(len(todo), os.cpu_count() or 1, 8))
        with ThreadPoolExecutor(workers, thread_name_prefix="raysae-sha256") as pool:
            for i, digest in zip(todo, pool.map(lambda i: _digest(files[i][0], keys[i]), todo)):
                digests[i] = digest
    for (path, want), have in zip(files, digests):
        if have != want:
            raise CacheError(f"shard {path} fails its checksum (corrupt or changed); "
                             "rebuild the cache")
    if todo:
        write_stamp(folder, shards)


def _permutation(index: int, rows: int) -> np.ndarray:
    """The fixed within-shard row order of shard ``index``."""
    return np.random.default_rng([0x5EED, index]).permutation(rows)


def write_shard(folder: Path, index: int, batches: list[dict], dtype: str,
                origin: str = "the model") -> dict:
    """Write one shard (each file under a temp name, then renamed); return its manifest entry
    with partial sums. Non-finite activations (a broken model) are refused, naming ``origin``,
    before anything is written."""
    cols = {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in batches[0]}
    x = from_storage(cols["act"], dtype)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        blocks = np.unique(cols["block_id"][~finite])
        raise CacheError(f"{origin} gives NaN/inf activations in {int((~finite).sum())} of "
                         f"{len(x)} rows (token blocks {blocks[:5].tolist()}...); check the "
                         "model's weights; nothing of them was cached")
    order = _permutation(index, len(x))
    act = np.ascontiguousarray(cols["act"][order].view(STORAGE_DTYPE[dtype]))
    meta = {k: np.ascontiguousarray(cols[k][order]) for k in META_COLUMNS}
    name, meta_name = f"shard-{index:05d}.npy", f"shard-{index:05d}.meta.parquet"

    def save_npy(tmp):
        with open(tmp, "wb") as fh:
            np.save(fh, act, allow_pickle=False)

    io.write_with(folder / name, save_npy)
    io.write_with(folder / meta_name, lambda tmp: pq.write_table(pa.table(meta), tmp))
    x = x.astype(np.float64)
    return {"file": name, "meta": meta_name, "rows": len(act),
            "sha256": file_sha256(folder / name), "meta_sha256": file_sha256(folder / meta_name),
            "token_sha256": sha256_bytes(meta["token"].astype(np.int32).tobytes()),
            "sum": x.sum(0).tolist(), "sum_sq_norm": float((x * x).sum())}


def map_shard(folder: str | os.PathLike, entry: dict, dtype: str, d_in: int) -> np.ndarray:
    """One shard's activations, memory-mapped read-only [rows, d_in] in the storage dtype;
    its shape and dtype are checked against the manifest."""
    path = Path(folder) / entry["file"]
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise CacheError(f"shard {path} cannot be read as .npy ({err}); rebuild the cache") \
            from None
    want = (entry["rows"], d_in)
    if arr.shape != want or arr.dtype != STORAGE_DTYPE[dtype]:
        raise CacheError(f"shard {path} holds {arr.dtype}{list(arr.shape)}, the manifest says "
                         f"{np.dtype(STORAGE_DTYPE[dtype])}{list(want)}; rebuild the cache")
    return arr


def read_shard(folder: str | os.PathLike, entry: dict, dtype: str) -> np.ndarray:
    """One shard's activations as float32 [rows, d_in], in stored row order (no checks)."""
    arr = np.load(Path(folder) / entry["file"], allow_pickle=False)
    return from_storage(arr, dtype)


def read_meta(folder: str | os.PathLike, entry: dict,
              columns: tuple[str, ...] = META_COLUMNS) -> dict[str, np.ndarray]:
    """One shard's block_id / pos / token columns, in the same row order as its activations."""
    table = pq.read_table(Path(folder) / entry["meta"], columns=list(columns))
    return {k: table[k].to_numpy() for k in columns}


def nonfinite_rows(arr: np.ndarray, dtype: str, chunk: int = 65_536) -> int:
    """How many rows of a (memory-mapped) stored array hold NaN/inf, read in chunks."""
    return sum(int((~np.isfinite(from_storage(np.asarray(arr[i : i + chunk]), dtype)))
                   .any(axis=1).sum()) for i in range(0, len(arr), chunk))
