import dataclasses
import hashlib
import json
import os
import shutil
import threading
import time

import numpy as np
import pytest
import torch

from raysae.activations.batches import iter_activation_batches, shuffled_batches
from raysae.activations.cache import (
    PROGRESS,
    CacheError,
    build_cache,
    load_manifest,
    read_shard,
    verify_cache,
)
from raysae.activations.shards import file_sha256, read_meta, write_shard
from raysae.activations.source import (
    ActivationSource,
    from_storage,
    source_block_stream,
    source_blocks,
    to_storage,
)

HOOK = "blocks.0.hook_resid_post"


def _src(model_dir, **kw) -> ActivationSource:
    base = dict(model=str(model_dir), hook=HOOK, context_length=32, n_tokens=2000,
                batch_blocks=8, shard_rows=512, num_actors=1)
    return ActivationSource(**{**base, **kw})


def _rows(path):
    """All rows of a cache, sorted by (block_id, pos): ids [n, 2] and float32 acts [n, d]."""
    manifest = load_manifest(path)
    ids, acts = [], []
    for entry in manifest["shards"]:
        meta = read_meta(path, entry)
        ids.append(np.stack([meta["block_id"], meta["pos"]], 1))
        acts.append(read_shard(path, entry, manifest["dtype"]))
    ids, acts = np.concatenate(ids), np.concatenate(acts)
    order = np.lexsort((ids[:, 1], ids[:, 0]))
    return ids[order], acts[order]


@pytest.fixture(scope="module")
def fp32_cache(tiny_model_dir, ray_local, tmp_path_factory):
    src = _src(tiny_model_dir)
    return src, build_cache(src, tmp_path_factory.mktemp("acts"), progress=False)


def test_pipeline_equals_direct_run_with_cache(fp32_cache, tiny_model):
    src, path = fp32_cache
    ids, acts = _rows(path)
    assert len(ids) == src.n_tokens == load_manifest(path)["n_tokens"]
    assert len(np.unique(ids, axis=0)) == len(ids)  # no duplicated (block, pos)
    assert ids[:, 1].min() == 1  # the BOS position is dropped
    blocks = torch.from_numpy(source_blocks(src)).long()
    _, cache = tiny_model.run_with_cache(blocks, names_filter=HOOK)  # full forward, no stop
    expected = cache[HOOK][ids[:, 0], ids[:, 1]]
    torch.testing.assert_close(torch.from_numpy(acts), expected, rtol=1e-5, atol=1e-5)


def test_in_process_build_equals_the_ray_data_build(fp32_cache, tmp_path, monkeypatch):
    """A trial on a cluster node builds its node's cache with the model in its own process
    (its own GPU share), no Ray Data actor pool: the same rows, the same values."""
    from raysae.activations import harvest

    src, path = fp32_cache
    monkeypatch.setattr(harvest, "harvest_dataset", lambda *a, **k: pytest.fail("used Ray"))
    here = build_cache(src, tmp_path, progress=False, in_process=True)
    (ids, acts), (ids2, acts2) = _rows(path), _rows(here)
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_allclose(acts, acts2, rtol=1e-5, atol=1e-6)
    assert verify_cache(here)["n_tokens"] == src.n_tokens


def test_a_trial_waits_for_the_node_builder_only_as_long_as_allowed(fp32_cache, tmp_path):
    from filelock import FileLock

    src, _ = fp32_cache
    lock = tmp_path / f"{src.cache_key()}.lock"
    with FileLock(str(lock)), pytest.raises(
            CacheError, match=rf"waited 0.2 s for another process building .*{lock.name}"):
        build_cache(src, tmp_path, progress=False, in_process=True, lock_timeout=0.2)


def test_manifest_records_settings_and_stats(fp32_cache):
    src, path = fp32_cache
    m = load_manifest(path)
    assert m["settings"] == src.cache_settings() and m["key"] == path.name
    assert (m["hook"], m["dtype"], m["d_in"], m["context_length"]) == (HOOK, "float32", 32, 32)
    assert m["tokens_sha256"] == hashlib.sha256(source_blocks(src).tobytes()).hexdigest()
    _, acts = _rows(path)
    assert m["stats"]["mean_sq_norm"] == pytest.approx(float((acts**2).sum(1).mean()), rel=1e-5)
    np.testing.assert_allclose(m["stats"]["mean"], acts.mean(0), rtol=1e-4, atol=1e-5)
    assert len(m["shards"]) >= 2 and all(len(s["sha256"]) == 64 for s in m["shards"])
    assert m["format_version"] == 2 and all(len(s["meta_sha256"]) == 64 for s in m["shards"])
    assert all((path / s["file"]).suffix == ".npy" for s in m["shards"])
    assert sum(s["rows"] for s in m["shards"]) == src.n_tokens


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_shard_round_trip(tmp_path, dtype):
    x = torch.randn(300, 16) * 3
    stored = to_storage(x, dtype)
    batch = {"block_id": np.arange(300) // 10, "pos": np.arange(300) % 10,
             "token": np.arange(300, dtype=np.int32), "act": stored}
    entry = write_shard(tmp_path, 0, [batch], dtype)
    back = read_shard(tmp_path, entry, dtype)
    assert back.dtype == np.float32
    order = read_meta(tmp_path, entry)["token"]  # rows are shuffled within the shard
    assert not np.array_equal(order, np.arange(300))
    back = back[np.argsort(order)]
    np.testing.assert_array_equal(back, from_storage(stored, dtype))  # storage is lossless
    if dtype == "float32":
        np.testing.assert_array_equal(back, x.numpy())
    else:
        np.testing.assert_allclose(back, x.numpy(), rtol=1e-2, atol=1e-2)


def test_rebuild_does_not_duplicate(fp32_cache):
    src, path = fp32_cache
    before = sorted(os.listdir(path))
    assert build_cache(src, path.parent, progress=False) == path
    assert sorted(os.listdir(path)) == before
    assert verify_cache(path)["n_tokens"] == src.n_tokens
    assert not (path.parent / f"{path.name}.partial").exists()


def test_corrupted_shard_is_detected(fp32_cache, tmp_path):
    _, path = fp32_cache
    bad = tmp_path / path.name
    shutil.copytree(path, bad)
    shard = bad / load_manifest(bad)["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="checksum"):
        verify_cache(bad)
    with pytest.raises(CacheError, match=f"shard {shard} fails its checksum"):
        iter_activation_batches(bad, 64)  # when opened, before any batch


def test_cache_with_other_settings_is_refused(fp32_cache, tmp_path):
    src, path = fp32_cache
    other = dataclasses.replace(src, hook="blocks.1.hook_resid_post")
    shutil.copytree(path, tmp_path / other.cache_key())
    with pytest.raises(CacheError, match="other settings.*hook"):
        build_cache(other, tmp_path, progress=False)
    with pytest.raises(CacheError, match="other settings"):
        next(iter_activation_batches(path, 64, expect=other))
    with pytest.raises(CacheError, match="no manifest.json"):
        load_manifest(tmp_path)


def test_reader_shuffles_loops_and_is_seeded(fp32_cache):
    src, path = fp32_cache
    _, acts = _rows(path)
    one = list(iter_activation_batches(path, 100, seed=0))
    rows = torch.cat(one).numpy()
    assert rows.shape == (src.n_tokens, 32) and rows.dtype == np.float32
    assert all(len(b) == 100 for b in one)
    np.testing.assert_array_equal(np.unique(rows, axis=0), np.unique(acts, axis=0))
    assert not np.array_equal(rows[:100], acts[:100])
    looped = list(iter_activation_batches(path, 128, n_tokens=5000, seed=3))
    assert sum(len(b) for b in looped) == 5000 and len(looped[-1]) == 5000 % 128
    again = list(iter_activation_batches(path, 128, n_tokens=5000, seed=3))
    assert all(torch.equal(a, b) for a, b in zip(looped, again))
    other = next(iter_activation_batches(path, 128, seed=4))
    assert not torch.equal(other, looped[0])


def test_shuffled_batches_epochs_cover_every_row_evenly():
    def chunks(epoch):
        for i in range(0, 1000, 70):
            yield np.arange(i, min(i + 70, 1000), dtype=np.float32)[:, None]

    out = torch.cat(list(shuffled_batches(chunks, 64, 3000, 200, seed=1))).squeeze(1)
    assert len(out) == 3000
    assert np.bincount(out.long().numpy(), minlength=1000).tolist() == [3] * 1000
    with pytest.raises(ValueError, match="no rows"):
        next(shuffled_batches(lambda e: iter(()), 8, 10, 10, 0))


def test_live_pipeline_matches_cache(fp32_cache):
    src, path = fp32_cache
    _, acts = _rows(path)
    live = torch.cat(list(iter_activation_batches(src, 256, seed=0)))
    assert live.shape == (src.n_tokens, 32)
    np.testing.assert_allclose(np.sort(live.numpy(), 0), np.sort(acts, 0), rtol=1e-5, atol=1e-6)


def test_each_shard_samples_the_whole_corpus(fp32_cache):
    """Blocks are harvested in a random order (source.HARVEST_ORDER), so every shard holds
    blocks from all over the corpus, not one stretch of it: the reader's shard windows then
    give a stationary training stream."""
    src, path = fp32_cache
    manifest = load_manifest(path)
    assert len(manifest["shards"]) >= 3
    for entry in manifest["shards"]:
        ids = np.unique(read_meta(path, entry)["block_id"])
        assert ids.max() - ids.min() > 0.6 * src.n_blocks, (ids.min(), ids.max())
        assert not np.all(np.diff(ids) == 1)


def test_live_stream_moves_on_through_the_corpus_each_epoch(fp32_cache):
    """Each epoch of a live stream harvests the corpus's next blocks (fresh tokens), not the
    same ones again."""
    src, path = fp32_cache
    stream = source_block_stream(src)
    first, second = next(stream), next(stream)
    assert first.shape == second.shape == (src.n_blocks, src.context_length)
    np.testing.assert_array_equal(first, source_blocks(src))
    both = source_blocks(dataclasses.replace(src, n_tokens=2 * src.n_tokens))
    np.testing.assert_array_equal(np.concatenate([first, second])[: len(both)], both)
    _, acts = _rows(path)
    live = torch.cat(list(iter_activation_batches(src, 250, n_tokens=2 * src.n_tokens,
                                                  seed=0))).numpy()
    seen = {row.tobytes() for row in acts}
    repeated = sum(row.tobytes() in seen for row in live)
    assert len(live) == 2 * src.n_tokens
    assert repeated < 1.2 * src.n_tokens, repeated  # epoch 0's rows once, epoch 1's new


def test_interrupted_build_resumes_without_duplicates(fp32_cache, tmp_path):
    src, path = fp32_cache
    manifest = load_manifest(path)
    partial = tmp_path / f"{path.name}.partial"
    shutil.copytree(path, partial)
    (partial / "manifest.json").unlink()
    kept = []
    for entry in manifest["shards"][:2]:  # recorded as done before the "crash"
        acts = read_shard(path, entry, "float32").astype(np.float64)
        kept.append({**entry, "sum": acts.sum(0).tolist()})
    (partial / PROGRESS).write_text(json.dumps({"tokens_sha256": manifest["tokens_sha256"],
                                                "shards": kept}))
    (partial / "shard-00009.npy.tmp").write_bytes(b"half-written")
    kept_files = {name: file_sha256(partial / name)
                  for e in kept for name in (e["file"], e["meta"])}
    resumed = build_cache(src, tmp_path, progress=False)
    for name, digest in kept_files.items():  # the finished shards were kept, not rewritten
        assert file_sha256(resumed / name) == digest
    assert load_manifest(resumed)["shards"][:2] == manifest["shards"][:2]
    ids, acts = _rows(resumed)
    ref_ids, ref_acts = _rows(path)
    np.testing.assert_array_equal(ids, ref_ids)  # every row once, none twice
    np.testing.assert_allclose(acts, ref_acts, rtol=1e-5, atol=1e-6)
    stats = load_manifest(resumed)["stats"]
    assert stats["mean_sq_norm"] == pytest.approx(manifest["stats"]["mean_sq_norm"], rel=1e-6)
    assert not partial.exists()


def _harvester_actor_ids(ray):
    actors = ray._private.state.actors()  # no dashboard in tests, so the GCS table directly
    return [k for k, a in actors.items()
            if "Harvester" in a["ActorClassName"] and a["State"] == "ALIVE"]


def test_killed_actor_still_gives_complete_cache(tiny_model_dir, ray_local, tmp_path, fp32_cache):
    ray = ray_local
    src = _src(tiny_model_dir, n_tokens=8000, batch_blocks=2, shard_rows=300, num_actors=2,
               dtype="bfloat16")
    result = {}
    thread = threading.Thread(target=lambda: result.update(path=build_cache(src, tmp_path,
                                                                             progress=False)))
    thread.start()
    progress = tmp_path / f"{src.cache_key()}.partial" / PROGRESS
    deadline = time.time() + 300
    while not progress.exists() and time.time() < deadline:
        time.sleep(0.1)
    victims = _harvester_actor_ids(ray)
    assert thread.is_alive() and victims, "the build should still be running"
    worker = ray._private.worker.global_worker
    ray.kill(worker.core_worker.get_actor_handle(ray.ActorID.from_hex(victims[0])),
             no_restart=False)
    thread.join(timeout=600)
    path = result["path"]
    manifest = verify_cache(path)
    assert manifest["n_tokens"] == 8000 and manifest["dtype"] == "bfloat16"
    ids, acts = _rows(path)
    assert len(ids) == 8000 and len(np.unique(ids, axis=0)) == 8000
    restarts = [a.get("NumRestarts", 0) for a in ray._private.state.actors().values()]
    assert max(restarts) >= 1  # the actor really died and was replaced
    ref_ids, ref_acts = _rows(fp32_cache[1])  # same first blocks, stored in fp32
    np.testing.assert_array_equal(ids[: len(ref_ids)], ref_ids)
    np.testing.assert_allclose(acts[: len(ref_ids)], ref_acts, rtol=2e-2, atol=2e-2)


def _cli(argv):
    import argparse

    from raysae.cli.cache import add_build_model_parser, add_cache_parser

    parser = argparse.ArgumentParser(prog="raysae")
    sub = parser.add_subparsers(dest="command", required=True)
    add_cache_parser(sub)
    add_build_model_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_cache_prints_manifest(fp32_cache, capsys):
    src, path = fp32_cache
    argv = ["cache", "--model", src.model, "--hook", HOOK, "--context-length", "32",
            "--n-tokens", "2000", "--cache-root", str(path.parent), "--quiet", "--verify"]
    assert _cli(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["path"] == str(path) and out["n_tokens"] == 2000 and out["d_in"] == 32
    with pytest.raises(ValueError, match="close matches"):
        _cli(argv[:3] + ["--hook", "blocks.0.hook_resid_pots"] + argv[5:])


def test_cli_build_model_prints_metadata(tiny_model_dir, capsys):
    assert _cli(["build-model", "--tiny", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["path"] == str(tiny_model_dir) and out["held_out_ce"] > 0


def test_shards_only_close_on_whole_blocks():
    from raysae.activations.cache import _whole_blocks

    src = ActivationSource(model="unused", context_length=4, n_tokens=10)  # 3 rows a block
    assert _whole_blocks(src, [{"block_id": np.array([0, 0, 0, 3])}])  # block 3 holds 1 row
    assert not _whole_blocks(src, [{"block_id": np.array([0, 0, 0, 1])}])


def test_live_stream_wraps_round_a_short_corpus_and_refuses_one_too_short(tiny_model_dir,
                                                                          tmp_path):
    """A corpus of L blocks, epochs of n < L < 2n: the second epoch is blocks n..L-1 then
    the corpus from its start again; a corpus shorter than one epoch is refused by name."""
    from transformers import AutoTokenizer

    from raysae.lm import corpus

    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text(" ".join(f"word{i}" for i in range(3000)))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    everything = corpus.token_blocks(str(text), tok, 32, split="all").astype(np.int32)
    total = len(everything)
    n = total * 2 // 3
    src = _src(tiny_model_dir, dataset=str(text), split="all", n_tokens=n * 31)
    stream = source_block_stream(src)
    first, second = next(stream), next(stream)
    np.testing.assert_array_equal(first, everything[:n])
    np.testing.assert_array_equal(second, everything[(n + np.arange(n)) % total])
    too_long = _src(tiny_model_dir, dataset=str(text), split="all", n_tokens=(total + 1) * 31)
    with pytest.raises(ValueError, match="holds only"):
        source_blocks(too_long)
