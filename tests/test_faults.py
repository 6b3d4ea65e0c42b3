"""Faults: a cache build killed at a random point then rerun; a read-only, full or nearly full
results disk; a cache shard holding NaN under a valid checksum (found by verify_cache; a
trial fed it fails once on the trainer's NaN check); a model that gives NaN.

Disks are real: tiny tmpfs mounts (tests run as root here; without mount rights those cases
skip and the free-space threshold is still tested through its parameter)."""

import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from raysae import cli
from raysae.activations.batches import iter_activation_batches
from raysae.activations.cache import (
    PROGRESS,
    CacheError,
    build_cache,
    default_cache_root,
    load_manifest,
    verify_cache,
)
from raysae.activations.shards import file_sha256, read_meta
from raysae.activations.source import ActivationSource, source_blocks
from raysae.search.preflight import preflight_writable

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.0.hook_resid_post"

BUILD = """
import json, sys
import ray
from raysae.activations.cache import build_cache
from raysae.activations.source import ActivationSource
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
build_cache(ActivationSource(**json.loads(sys.argv[2])), sys.argv[3], progress=False)
"""


def _src(model_dir, **kw) -> ActivationSource:
    base = dict(model=str(model_dir), hook=HOOK, context_length=32, n_tokens=2048,
                batch_blocks=4, shard_rows=512, num_actors=1)
    return ActivationSource(**{**base, **kw})


@pytest.fixture(scope="module")
def small_cache(tiny_model_dir, ray_local, tmp_path_factory):
    return build_cache(_src(tiny_model_dir), tmp_path_factory.mktemp("acts"), progress=False)


def _shards_done(partial: Path) -> int:
    try:
        return len(json.loads((partial / PROGRESS).read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def _kill_build_at_random_point(src, root: Path, gcs: str, rng: random.Random) -> int:
    """Start a build in a driver process, SIGKILL it after a random number of finished shards
    (0 = while the model still harvests) plus a random delay; return that shard count."""
    target = rng.randint(0, src.n_tokens // (2 * src.shard_rows))  # well below the last shard
    partial = root / f"{src.cache_key()}.partial"
    proc = subprocess.Popen([sys.executable, "-c", BUILD, gcs, json.dumps(dataclasses.asdict(src)),
                             str(root)], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (partial.exists() and _shards_done(partial) >= target):
            assert proc.poll() is None and time.time() < deadline, "build ended before the kill"
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.2))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (root / src.cache_key() / "manifest.json").exists(), "the kill came too late"
    return _shards_done(partial)


@pytest.mark.parametrize("attempt", range(int(os.environ.get("RAYSAE_FAULT_REPEATS", "1"))))
def test_cache_build_killed_at_random_point_then_rerun_is_complete(tiny_model_dir, ray_local,
                                                                   tmp_path, attempt):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    src = _src(tiny_model_dir, n_tokens=8000, shard_rows=500)
    gcs = ray_local.get_runtime_context().gcs_address
    done = _kill_build_at_random_point(src, tmp_path, gcs, rng)
    print(f"cache build killed after {done} finished shards (seed {seed})")
    path = build_cache(src, tmp_path, progress=False)  # the rerun resumes the partial build
    manifest = verify_cache(path)  # every shard's sha256 and the row count
    assert not (tmp_path / f"{src.cache_key()}.partial").exists()
    ids, tokens = [], []
    for entry in manifest["shards"]:
        meta = read_meta(path, entry)
        shard_tokens = meta["token"]
        # the manifest's token-id checksum of each shard matches what the shard holds
        assert entry["token_sha256"] == hashlib.sha256(
            np.ascontiguousarray(shard_tokens).tobytes()).hexdigest()
        assert len(np.load(path / entry["file"], mmap_mode="r")) == len(shard_tokens)
        ids.append(np.stack([meta["block_id"], meta["pos"]], 1))
        tokens.append(shard_tokens)
    ids, tokens = np.concatenate(ids), np.concatenate(tokens)
    order = np.lexsort((ids[:, 1], ids[:, 0]))
    ids, tokens = ids[order], tokens[order]
    assert len(ids) == src.n_tokens == len(np.unique(ids, axis=0)), f"seed {seed}, {done} done"
    # exactly the token ids of the source blocks (BOS dropped), each once, none missing
    expected = source_blocks(src)[:, 1:].reshape(-1)[: src.n_tokens]
    assert hashlib.sha256(tokens.astype(np.int32).tobytes()).hexdigest() == hashlib.sha256(
        expected.astype(np.int32).tobytes()).hexdigest(), f"seed {seed}, killed after {done}"
    assert manifest["tokens_sha256"] == hashlib.sha256(source_blocks(src).tobytes()).hexdigest()


def _nan_copy(cache: Path, dest: Path, shard_index: int = 1) -> str:
    """Copy a cache; overwrite one shard's activations with NaN in 3 rows and re-record its
    checksum, as a corrupt writer would; return that shard's file name."""
    shutil.copytree(cache, dest)
    manifest = load_manifest(dest)
    entry = manifest["shards"][shard_index]
    act = np.load(dest / entry["file"])
    act[[0, 7, 42]] = np.nan
    np.save(dest / entry["file"], act)
    entry["sha256"] = file_sha256(dest / entry["file"])
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return entry["file"]


def test_nan_shard_with_valid_checksum_is_named(small_cache, tmp_path):
    from raysae.core.config import SAEConfig, TrainConfig
    from raysae.core.ladder import LadderTrainer
    from raysae.core.outcome import NonFiniteActivationsError
    from raysae.core.training import drive

    bad = tmp_path / "nan_cache"
    name = _nan_copy(small_cache, bad)
    with pytest.raises(CacheError, match=rf"shard {bad / name} holds NaN/inf in 3 of \d+ rows"):
        verify_cache(bad)
    # The reader checks checksums only (NaN is refused when a cache is built); the trainer
    # refuses the NaN rows when they reach it.
    rows = np.concatenate([b.numpy() for b in iter_activation_batches(bad, 256)])
    assert np.isnan(rows).any(axis=1).sum() == 3
    cfg = TrainConfig(sae=SAEConfig(32, 64), batch_size=256, total_tokens=2048, log_every=4)
    with pytest.raises(NonFiniteActivationsError, match="NaN/inf"):
        drive(LadderTrainer(cfg, [8.0]), iter_activation_batches(bad, 256))


def test_nan_shard_fails_the_trial_once(small_cache, tiny_model_dir, tmp_path):
    import pandas as pd
    from search_helpers import make_plan, make_spec

    from raysae.search.stages import run_search

    bad = tmp_path / "nan_cache"
    _nan_copy(small_cache, bad)
    spec = make_spec(activations=str(bad), model=str(tiny_model_dir), hook=HOOK, d_in=32,
                     d_sae=64, context_length=32, total_tokens=4096, batch_size=256,
                     lambda_mode="fixed", eval_blocks=4, feature_tokens=512)
    settings = make_plan("nan", str(tmp_path / "tune"), spec, grid=({"p": 1.0, "lam": 1.0},),
                         max_failures=0)
    row = pd.read_parquet(run_search(settings, tmp_path / "r") / "trials.parquet").iloc[0]
    assert row["status"] == "error"
    # The table's status_reason and Tune's error file both hold the trainer's message.
    assert row["status_reason"].startswith("NonFiniteActivationsError: "), row["status_reason"]
    assert "rebuild the activation cache" in row["status_reason"]
    error = (Path(row["trial_dir"]) / "error.txt").read_text()
    assert "NonFiniteActivationsError: " in error, error[-2000:]


def _job_args(model, tmp_path, results=None, storage=None):
    return ["--model", str(model), "--hook", HOOK, "--context-length", "32", "--targets", "8",
            "--num-trials", "1", "--total-tokens", "4096", "--cache-tokens", "2048",
            "--batch-size", "256", "--storage", str(storage or tmp_path / "tune"),
            "--results", str(results or tmp_path / "results"), "--no-report"]


def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and ": error: " in lines[-1] and len(
        [x for x in lines if "error:" in x]) == 1, lines
    return lines[-1]


def test_model_giving_nan_is_named_and_leaves_no_results_folder(tiny_model_dir, ray_local,
                                                                tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken_model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "raysae_model.json").unlink()  # its build hash would name the healthy model
    weights = load_file(str(broken / "model.safetensors"))
    key = next(k for k in weights if "embed_in" in k)
    weights[key][:50] = float("nan")  # the 50 lowest token ids embed to NaN
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    assert cli.main(["search", *(_job_args(broken, tmp_path))]) == 2
    line = _error(capsys)
    assert f"model {broken} at hook {HOOK} gives NaN/inf activations" in line, line
    assert "check the model" in line
    assert not (tmp_path / "results").exists() and not (tmp_path / "tune").exists()


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, size, ro=False) -> a fresh tmpfs folder (unmounted at teardown)."""
    mounted = []

    def mount(name: str, size: str, ro: bool = False) -> Path:
        path = tmp_path / name
        path.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                             capture_output=True, text=True)
        if out.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip()})")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder: Path) -> None:
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


@pytest.mark.parametrize("disk, flag, phrase", [
    ("read-only", "--results", "not writable (Read-only file system"),
    ("full", "--results", "not writable (No space left on device"),
    ("nearly full", "--results", "MiB free (need 100 MiB)"),
    ("full", "--storage", "--storage folder"),
])
def test_unwritable_disk_fails_before_any_work(disk, flag, phrase, tiny_model_dir, tmpfs,
                                               tmp_path, capsys):
    mnt = tmpfs("disk", "8m" if disk == "nearly full" else "1m", ro=disk == "read-only")
    if disk == "full":
        _fill(mnt)
    cache_before = sorted(os.listdir(default_cache_root())) if default_cache_root().exists() \
        else []
    target = {flag.strip("-"): mnt / "out"}
    assert cli.main(["search", *(_job_args(tiny_model_dir, tmp_path, **target))]) == 2
    line = _error(capsys)
    assert f"{flag} folder {mnt / 'out'}" in line and phrase in line, line
    assert f"pass {flag}" in line or "free space" in line
    assert not (mnt / "out").exists()
    assert not (tmp_path / "results").exists() and not (tmp_path / "tune").exists()
    now = sorted(os.listdir(default_cache_root())) if default_cache_root().exists() else []
    assert now == cache_before


def test_free_space_threshold_is_a_parameter(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    preflight_writable(tmp_path / "a" / "b", min_free_bytes=1)
    with pytest.raises(ValueError, match=r"--results folder .* MiB free \(need"):
        preflight_writable(tmp_path / "a" / "b", min_free_bytes=free + 2**30)
    assert not (tmp_path / "a").exists()  # the check creates nothing
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        preflight_writable(tmp_path / "f" / "out")


LOAD_DRIVER = """
import json, resource, sys, threading, time
from raysae import cli

seen = {"alive": 0}


def watch():  # the most trial actors alive at once (Ray's GCS actor table)
    import ray
    while True:
        time.sleep(1)
        try:
            if ray.is_initialized():
                alive = sum(a["State"] == "ALIVE" and "ImplicitFunc" in a["ActorClassName"]
                            for a in ray._private.state.actors().values())
                seen["alive"] = max(seen["alive"], alive)
        except Exception:
            pass


threading.Thread(target=watch, daemon=True).start()
start = time.time()
rc = cli.main(["search", *(sys.argv[1:])])
print("LOAD " + json.dumps({"rc": rc, "wall_s": round(time.time() - start, 1),
      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      "max_alive_trials": seen["alive"]}), flush=True)
"""


@pytest.mark.slow
def test_twenty_concurrent_trials_on_two_cpus(tiny_model_dir, tmp_path):
    """20 lightweight trials at 0.1 CPU each on the 2-CPU machine, through the job's own
    embedded Ray: every trial reported once, the driver's peak RSS bounded, and no credential
    from the environment in any file the job wrote."""
    import secrets

    import pandas as pd

    marker = secrets.token_hex(16)
    env = {**os.environ, "RAY_ADDRESS": "", "RAYSAE_RAY_ADDRESS": "", "RAY_AUTH_TOKEN": marker,
           "AWS_SECRET_ACCESS_KEY": marker, "HF_TOKEN": marker}
    args = ["--model", str(tiny_model_dir), "--hook", HOOK, "--context-length", "32",
            "--targets", "8", "--num-trials", "20", "--rung", "0", "--seeds", "0",
            "--max-concurrent", "20",
            "--cpus-per-trial", "0.1", "--total-tokens", "5120", "--cache-tokens", "4096",
            "--batch-size", "256", "--storage", str(tmp_path / "tune"),
            "--results", str(tmp_path / "results")]
    out = subprocess.run([sys.executable, "-c", LOAD_DRIVER, *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)
    lines = [x for x in out.stdout.splitlines() if x.startswith("LOAD ")]
    assert lines, out.stderr[-3000:]
    load = json.loads(lines[-1][5:])
    print(f"load test: {load}")
    assert load["rc"] == 0, out.stderr[-3000:]
    trials = pd.read_parquet(tmp_path / "results" / "trials.parquet")
    # 20 Optuna trials plus the references and the default baselines, each once.
    from raysae.core.kinds import default_baselines
    from raysae.core.penalties import reference_points

    assert len(trials) == 20 + len(reference_points()) + len(default_baselines())
    assert trials["trial_id"].is_unique
    assert (trials["stage"] == "search").sum() == 20
    assert set(trials["status"]) == {"finished"}, trials["status"].value_counts()
    assert trials["ce_sae"].notna().all() and (tmp_path / "results" / "report.html").exists()
    assert load["max_alive_trials"] >= 10  # they really ran side by side
    assert load["peak_rss_mib"] < 3072  # bounded: measured ~1.2 GiB (docs/reliability.md)
    written = [tmp_path / "results", tmp_path / "tune", default_cache_root()]
    for path in (p for folder in written for p in folder.rglob("*") if p.is_file()):
        assert marker.encode() not in path.read_bytes(), f"credential written to {path}"
