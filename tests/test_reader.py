"""The cache reader on synthetic caches (no model, no Ray): every row once per epoch, seeded
order, stored dtype, checksums at open, old formats refused, the prefetch thread's life."""

import json
import shutil
import threading

import numpy as np
import pytest
import torch

from raysae.activations import reader, shards
from raysae.activations.batches import iter_activation_batches
from raysae.activations.cache import (
    FORMAT_VERSION,
    CacheError,
    load_manifest,
    verify_cache,
    write_arrays_cache,
)
from raysae.activations.shards import read_meta, write_shard
from raysae.activations.source import ActivationSource, to_storage


def _reader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("raysae-reader")]


@pytest.fixture(scope="module")
def ids_cache(tmp_path_factory):
    """5_003 rows whose 3 columns hold the row id (float32 is exact up to 2**24); shards of
    1_010 rows (whole blocks of 101), so shards, windows and blocks all end off-grid."""
    n = 5_003
    acts = np.repeat(np.arange(n, dtype=np.float32)[:, None], 3, axis=1)
    return write_arrays_cache(tmp_path_factory.mktemp("r") / "ids", acts, "float32",
                              shard_rows=1_000, tokens_per_block=101), n


def _ids(batches) -> np.ndarray:
    rows = torch.cat(list(batches)).numpy()
    assert (rows == rows[:, :1]).all()  # no row torn across a copy
    return rows[:, 0].astype(np.int64)


@pytest.mark.parametrize("batch, block_rows, window", [(64, 256, 4), (100, 37, 2), (999, 1, 1),
                                                      (7000, 128, 3)])
def test_every_row_exactly_once_per_epoch(ids_cache, batch, block_rows, window):
    path, n = ids_cache
    total = 2 * n + 17  # two epochs, a bit of a third, a partial last batch
    batches = list(iter_activation_batches(path, batch, n_tokens=total, seed=5,
                                           block_rows=block_rows, window=window, prefetch=2))
    assert [len(b) for b in batches] == [batch] * (total // batch) + [total % batch] * (
        total % batch > 0)
    ids = _ids(batches)  # all batches held at once: no buffer was reused under them
    for epoch in range(2):
        assert np.array_equal(np.sort(ids[epoch * n : (epoch + 1) * n]), np.arange(n))
    assert len(np.unique(ids[2 * n :])) == 17
    assert not np.array_equal(ids[:n], ids[n : 2 * n])  # each epoch has its own order


def test_rows_are_mixed_across_shards(ids_cache):
    path, n = ids_cache
    first = _ids(iter_activation_batches(path, 500, n_tokens=500, seed=0))
    shard_of = first // 1_010
    assert len(np.unique(shard_of)) >= 2  # one batch draws from several shards of its window
    assert np.abs(np.diff(first)).mean() > 50  # and is not a run of neighbouring rows


def test_order_is_set_by_the_seed(ids_cache):
    path, _ = ids_cache
    one = _ids(iter_activation_batches(path, 256, n_tokens=3000, seed=3))
    again = _ids(iter_activation_batches(path, 256, n_tokens=3000, seed=3, prefetch=1))
    other = _ids(iter_activation_batches(path, 256, n_tokens=3000, seed=4))
    assert np.array_equal(one, again) and not np.array_equal(one, other)


@pytest.mark.parametrize("start", [0, 1, 100, 1_009, 1_010, 4_999, 5_003, 7_777, 12_000])
@pytest.mark.parametrize("block_rows, window", [(101, 2), (37, 1)])
def test_a_reader_started_mid_stream_gives_the_rest_of_the_same_stream(ids_cache, start,
                                                                        block_rows, window):
    """A restarted trial asks for its seed's stream from the row it reached: the rows are
    those an uninterrupted reader gives from there, in the same batches when the restart is
    at a batch boundary (epochs, windows and blocks cut anywhere)."""
    path, _ = ids_cache
    total, batch = 13_000, 100
    whole = _ids(iter_activation_batches(path, batch, n_tokens=total, seed=7,
                                         block_rows=block_rows, window=window))
    rest = list(iter_activation_batches(path, batch, n_tokens=total - start, seed=7,
                                        start=start, block_rows=block_rows, window=window))
    assert np.array_equal(_ids(rest), whole[start:])
    if start % batch == 0:
        assert [len(b) for b in rest] == [batch] * ((total - start) // batch)


def test_live_stream_started_mid_stream_replays_the_rest(tmp_path):
    """The live pipeline's restart: the same rows as the uninterrupted stream from there."""
    from raysae.activations.batches import shuffled_batches, skip_rows

    def chunks(epoch):
        for i in range(0, 900, 70):
            yield np.arange(epoch * 900 + i, epoch * 900 + min(i + 70, 900),
                            dtype=np.float32)[:, None]

    whole = torch.cat(list(shuffled_batches(chunks, 64, 2000, 200, seed=3)))
    for start in (0, 64, 640, 1280, 1300):
        rest = list(skip_rows(shuffled_batches(chunks, 64, 2000, 200, seed=3), start))
        assert torch.equal(torch.cat(rest), whole[start:])
        assert start % 64 or all(len(b) == 64 for b in rest[:-1])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_batches_keep_the_stored_dtype_and_values(tmp_path, dtype):
    x = torch.randn(700, 16) * 3
    stored = to_storage(x, dtype)
    path = write_arrays_cache(tmp_path / dtype, stored, dtype, shard_rows=300,
                              tokens_per_block=50)
    batch = next(iter_activation_batches(path, 700, seed=0))
    assert batch.dtype == getattr(torch, dtype) and batch.shape == (700, 16)
    want = torch.from_numpy(stored).view(batch.dtype)

    def rows_sorted(t):  # the same rows, bit for bit, in any order
        a = t.float().numpy()
        return a[np.lexsort(a.T[::-1])]

    np.testing.assert_array_equal(rows_sorted(batch), rows_sorted(want))


def test_shard_rows_are_shuffled_at_build_with_their_metadata(tmp_path):
    rows = np.arange(400)
    batch = {"block_id": rows // 20, "pos": (rows % 20).astype(np.int16),
             "token": rows.astype(np.int32), "act": np.stack([rows, -rows], 1).astype(np.float16)}
    entry = write_shard(tmp_path, 3, [batch], "float16")
    act = np.load(tmp_path / entry["file"])
    meta = read_meta(tmp_path, entry)
    assert act.dtype == np.float16 and not np.array_equal(act[:, 0], rows)
    assert np.array_equal(act[:, 0].astype(int), meta["token"])  # same row order
    assert np.array_equal(meta["block_id"] * 20 + meta["pos"], meta["token"])
    (tmp_path / "again").mkdir()
    again = write_shard(tmp_path / "again", 3, [batch], "float16")  # a fixed permutation
    assert again["sha256"] == entry["sha256"]


def test_nan_harvest_is_refused_before_writing(tmp_path):
    act = np.ones((50, 4), np.float32)
    act[7, 2] = np.nan
    batch = {"block_id": np.arange(50) // 10, "pos": np.zeros(50, np.int16),
             "token": np.zeros(50, np.int32), "act": act}
    with pytest.raises(CacheError, match=r"gives NaN/inf activations in 1 of 50 rows"):
        write_shard(tmp_path, 0, [batch], "float32", "model m at hook h")
    assert list(tmp_path.iterdir()) == []


def _flip_byte(path, where=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("which", ["file", "meta"])
def test_corrupt_shard_is_refused_at_open(ids_cache, tmp_path, which):
    path, _ = ids_cache
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    entry = load_manifest(bad)["shards"][3]
    _flip_byte(bad / entry[which])
    with pytest.raises(CacheError, match=rf"shard {bad / entry[which]} fails its checksum"):
        iter_activation_batches(bad, 64)  # at the call, before any batch or thread
    assert not _reader_threads()
    with pytest.raises(CacheError, match="fails its checksum"):
        verify_cache(bad)


def test_checksums_are_hashed_once_per_node(ids_cache, tmp_path, monkeypatch):
    """The first open hashes every file and stamps the folder; later opens (this process, or
    a new one: the in-process memo cleared) hash nothing; a changed file is hashed again."""
    path, _ = ids_cache
    fresh = tmp_path / "fresh"
    shutil.copytree(path, fresh)
    (fresh / shards.VERIFIED_STAMP).unlink()  # as if built on another node and copied
    n_files = 2 * len(load_manifest(fresh)["shards"])  # .npy and .meta.parquet
    calls = []
    real = shards.file_sha256
    monkeypatch.setattr(shards, "file_sha256", lambda p: calls.append(p) or real(p))
    next(iter_activation_batches(fresh, 64))
    assert len(calls) == n_files
    next(iter_activation_batches(fresh, 64))
    assert len(calls) == n_files  # remembered in this process
    monkeypatch.setattr(shards, "_DIGESTS", {})  # a new trial process on the same node
    next(iter_activation_batches(fresh, 64))
    assert len(calls) == n_files  # the node's stamp
    entry = load_manifest(fresh)["shards"][2]
    _flip_byte(fresh / entry["file"])
    _flip_byte(fresh / entry["file"])  # same bytes again, but a new modification time
    next(iter_activation_batches(fresh, 64))
    assert calls[n_files:] == [fresh / entry["file"]]
    verify_cache(fresh)  # verify_cache always re-hashes
    assert len(calls) == 2 * n_files + 1


def test_a_stamp_never_hides_corruption(ids_cache, tmp_path):
    path, _ = ids_cache
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    next(iter_activation_batches(bad, 64))  # verified and stamped
    entry = load_manifest(bad)["shards"][0]
    _flip_byte(bad / entry["file"])
    with pytest.raises(CacheError, match="fails its checksum"):
        iter_activation_batches(bad, 64)


def test_nan_under_a_valid_checksum_is_found_by_verify_cache(ids_cache, tmp_path):
    path, _ = ids_cache
    bad = tmp_path / "nan"
    shutil.copytree(path, bad)
    manifest = load_manifest(bad)
    entry = manifest["shards"][1]
    act = np.load(bad / entry["file"])
    act[[0, 5, 9]] = np.nan
    np.save(bad / entry["file"], act)
    entry["sha256"] = shards.file_sha256(bad / entry["file"])
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=rf"shard {bad / entry['file']} holds NaN/inf in 3 of "
                                         rf"{entry['rows']} rows although its checksum matches"):
        verify_cache(bad)


def test_old_format_is_refused_with_the_rebuild_command(ids_cache, tmp_path):
    path, _ = ids_cache
    old = tmp_path / "old"
    shutil.copytree(path, old)
    manifest = load_manifest(old)
    manifest.update(format_version=1, model="local", hook="blocks.0.hook_resid_post",
                    dataset="stdlib", split="train", context_length=32, n_tokens=2000)
    (old / "manifest.json").write_text(json.dumps(manifest))
    message = rf"cache {old} was built by an older raysae \(format 1\); rebuild it with " \
              r"`raysae cache --model local --hook blocks.0.hook_resid_post --dataset stdlib " \
              rf"--split train --context-length 32 --n-tokens 2000 --dtype float32 " \
              rf"--cache-root {tmp_path}`"
    for call in (load_manifest, verify_cache, lambda p: iter_activation_batches(p, 64)):
        with pytest.raises(CacheError, match=message):
            call(old)
    assert FORMAT_VERSION == 2


def test_the_format_version_is_part_of_the_cache_key(monkeypatch):
    from raysae.activations import source

    src = ActivationSource(model="EleutherAI/pythia-70m-deduped")
    key = src.cache_key()
    monkeypatch.setattr(source, "FORMAT_VERSION", 1)
    assert src.cache_key() != key  # a format-1 cache is never found: it is rebuilt


def test_prefetch_thread_stops_when_the_consumer_stops(ids_cache):
    path, n = ids_cache
    for _ in iter_activation_batches(path, 64, n_tokens=10 * n, prefetch=2):
        break  # the generator is dropped here and closed
    assert not _reader_threads()
    gen = iter_activation_batches(path, 64, n_tokens=10 * n, prefetch=2)
    assert not _reader_threads()  # nothing starts before the first batch is asked for
    next(gen)
    assert len(_reader_threads()) == 1
    gen.close()
    assert not _reader_threads()
    gen = iter_activation_batches(path, 64, n_tokens=10 * n, prefetch=2)
    next(gen)
    del gen  # garbage collected without close()
    assert not _reader_threads()


def test_a_reader_error_is_raised_in_the_consumer(ids_cache, monkeypatch):
    path, _ = ids_cache
    real, calls = reader.BatchMaker.next_batch, []

    def failing(self, rows):
        calls.append(rows)
        if len(calls) == 3:
            raise OSError("disk gone")
        return real(self, rows)

    monkeypatch.setattr(reader.BatchMaker, "next_batch", failing)
    got = []
    with pytest.raises(OSError, match="disk gone"):
        for batch in iter_activation_batches(path, 64, prefetch=4):
            got.append(batch)
    assert len(got) == 2 and not _reader_threads()


def test_held_batches_are_never_overwritten(ids_cache):
    path, _ = ids_cache
    gen = iter_activation_batches(path, 128, n_tokens=4000, prefetch=1)
    first = next(gen)
    copy = first.clone()
    view = first[:10]
    del first
    rest = list(gen)  # many more batches than the pool has buffers
    assert torch.equal(view, copy[:10])
    assert not any(b.data_ptr() == view.data_ptr() for b in rest)
