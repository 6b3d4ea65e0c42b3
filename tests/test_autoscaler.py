"""The documented cluster run (issue #23), rehearsed on this machine: Ray's own autoscaler
(fake multi-node provider) launches GPU worker nodes ({CPU: 1, GPU: 1}; Ray's resource, no
CUDA) as the trials of `python searches/exponent_search.py` ask for them, Tune keeps its
experiments in S3 (moto's server), and the head's results folder ends with the tables, the
SAEs, the feature statistics and the report. See tests/autoscaler_rehearsal.py.

The rehearsal runs in its own process (and process group) with a private RAY_TMPDIR, which
marks every process it starts; the test checks that none outlives it (a leftover one is
killed by pid). `ray stop` is never run: it would stop every Ray on the machine.
"""

import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("moto")
pytest.importorskip("zstandard")

from autoscaler_rehearsal import (  # noqa: E402  (tests/ is on sys.path, as for pythia_checkpoint)
    JOB_NAME,
    MAX_WORKERS,
    PREFIX,
    WORKER_RESOURCES,
    write_corpus,
)
from isolated import run_rehearsal  # noqa: E402
from pythia_checkpoint import build_pythia70m_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 600
TIMEOUT_S = JOB_TIMEOUT_S + 240  # + S3, head start, node listing, shutdown
GPUS_PER_TRIAL = ""
"""--gpus-per-trial for the search; "" leaves the job's default (the GPU share it derives
from the autoscaler's node types, capacity.GPU_SHARE), as the documented command does."""
TARGETS = [8.0, 16.0]


@pytest.fixture(scope="module")
def pythia_dir(tmp_path_factory):
    return build_pythia70m_checkpoint(tmp_path_factory.mktemp("pythia-70m-random"))


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("pile-like"))


def _run_rehearsal(model: Path, corpus: Path, workdir: Path, ray_tmp: Path) -> tuple[dict, str]:
    summary = workdir / "summary.json"
    cmd = [sys.executable, str(ROOT / "tests" / "autoscaler_rehearsal.py"), "--model",
           str(model), "--corpus", str(corpus), "--workdir", str(workdir / "run"),
           "--summary", str(summary), "--timeout", str(JOB_TIMEOUT_S),
           "--gpus-per-trial", GPUS_PER_TRIAL]
    code, output, left = run_rehearsal(cmd, ray_tmp, TIMEOUT_S)
    data = json.loads(summary.read_text()) if summary.is_file() else {}
    assert code == 0, f"{output[-4000:]}\n{_diagnosis(data)}"
    assert not left, f"processes of the rehearsal outlived it: {left}\n{_diagnosis(data)}"
    return data, output


def _diagnosis(summary: dict) -> str:
    """What to read when the rehearsal fails: the job's output, the cluster's state."""
    parts = [("job output (tail)", summary.get("job_log_tail", "")[-6000:]),
             ("ray status", summary.get("ray_status", "")),
             ("autoscaler events (monitor.log)", summary.get("autoscaler_log_tail", "")),
             ("ray start (tail)", summary.get("ray_start_log_tail", "")),
             ("rehearsal error", summary.get("error", "")),
             ("seconds", json.dumps(summary.get("seconds", {})))]
    return "\n".join(f"----- {title} -----\n{text}" for title, text in parts if text)


def _workers(nodes) -> list[dict]:
    assert isinstance(nodes, list), nodes  # else the error text of listing them
    return [n for n in nodes if n["Alive"] and n["Resources"].get("GPU", 0) > 0]


def _finished_caches(root: Path) -> list[Path]:
    from raysae.activations.cache import CacheError, load_manifest

    out = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not folder.is_dir():  # a build's lock file
            continue
        with contextlib.suppress(CacheError):
            load_manifest(folder)
            out.append(folder)
    return out


def test_documented_search_on_an_autoscaling_cluster_with_s3(pythia_dir, corpus_dir,
                                                               tmp_path):
    ray_tmp = Path(os.path.realpath("/tmp")) / f"rsas-{os.getpid()}-{time.time_ns() % 10**6}"
    ray_tmp.mkdir()  # short: Ray's socket paths under it must stay < 108 characters
    start = time.time()
    try:
        summary, _ = _run_rehearsal(pythia_dir, corpus_dir, tmp_path, ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"autoscaler rehearsal: {time.time() - start:.0f} s; stages (cumulative s):",
          summary.get("seconds"))
    why = _diagnosis(summary)

    # The search: exit status 0, within its time.
    assert not summary.get("job_timed_out"), f"the search ran past {JOB_TIMEOUT_S} s\n{why}"
    assert summary.get("job_rc") == 0, f"the search exited {summary.get('job_rc')}\n{why}"

    # The autoscaler launched the GPU workers: before the search the cluster was the 0-CPU
    # head alone; after it, MAX_WORKERS live nodes of the worker type (GPU 1, CPU 1).
    before, after = summary["nodes_before"], summary["nodes"]
    assert not _workers(before) and len(before) == 1, (before, why)
    workers = _workers(after)
    assert len(workers) == MAX_WORKERS, (after, why)
    for node in workers:
        assert node["Resources"]["GPU"] == WORKER_RESOURCES["GPU"], node
        assert node["Resources"]["CPU"] == WORKER_RESOURCES["CPU"], node
    worker_ids = {n["NodeID"] for n in workers}
    head_id = before[0]["NodeID"]
    assert "ray.worker.gpu" in summary["ray_status"], why

    # The tables, in the head's local results folder (./results/<name>/analysis: the
    # storage is S3, so the job's default --results is under its working folder).
    results = Path(summary["results"])
    assert results == Path(summary["workdir"]) / "head" / "results" / JOB_NAME / "analysis"
    trials = pd.read_parquet(results / "trials.parquet")
    bad = trials[trials["status"] != "finished"]
    assert bad.empty, (bad[["label", "stage", "status", "status_reason"]].to_string(), why)
    assert trials["trial_id"].is_unique
    assert sorted(set(trials["target_l0"])) == TARGETS
    for column in ("l0", "fvu", "ce_clean", "ce_sae", "ce_zero"):
        assert trials[column].map(math.isfinite).all(), column
    # More trials than GPUs: the 2 GPU nodes ran every trial, some after others.
    n_trials = trials["trial_dir"].nunique()
    assert n_trials > MAX_WORKERS * WORKER_RESOURCES["GPU"], trials["trial_dir"]
    assert set(trials["stage"]) == {"refs", "search"}

    # Each SAE (SAELens layout) came back from S3 into the results folder, one per member.
    fetched = results / "checkpoints"
    for _, row in trials.iterrows():
        path = Path(row["checkpoint_path"])
        assert path.is_relative_to(fetched), path
        member = path / "sae" / str(int(row["member"]))
        assert (member / "sae_weights.safetensors").is_file(), member
        assert (member / "cfg.json").is_file(), member
    stats = pd.read_parquet(results / "feature_stats.parquet")
    assert len(stats) and set(stats["trial_id"]) == set(trials["trial_id"])
    assert (results / "report.html").stat().st_size > 10_000

    # Tune's experiments and checkpoints are in S3, not on the head's disk.
    keys = summary["s3_keys"]
    for stage in ("refs", "search"):
        assert any(k.startswith(f"{PREFIX}/{JOB_NAME}_{stage}/") and "/checkpoint_" in k
                   for k in keys), (stage, keys[:20])
    local = {p for p in summary["local_results_tree"] if p.count("/") <= 2}
    assert local == {"results", f"results/{JOB_NAME}", f"results/{JOB_NAME}/analysis"}, local

    # Every trial ran on a worker node, both workers were used, each trial knew its GPU.
    assert trials["node_id"].notna().all() and (trials["node_id"] != "").all()
    assert set(trials["node_id"]) <= worker_ids, (set(trials["node_id"]), worker_ids)
    assert head_id not in set(trials["node_id"])
    assert set(trials["node_id"]) == worker_ids
    gpu_ids = trials["gpu_ids"].fillna("").astype(str).str.strip()
    assert (gpu_ids != "").all(), trials[["label", "node_id", "gpu_ids"]].to_string()

    # The GPU share per trial: the job's default from the autoscaler's node types (no GPU
    # exists when the driver starts), read from Tune's "Logical resource usage" lines.
    if not GPUS_PER_TRIAL:
        from raysae.search.capacity import GPU_SHARE

        usage = re.findall(r"Logical resource usage: ([\d.]+)/\d+ CPUs, ([\d.]+)/\d+ GPUs",
                           Path(summary["job_log"]).read_text(errors="replace"))
        shares = {round(float(g) / float(c), 4) for c, g in usage if float(c) > 0}
        assert shares == {GPU_SHARE}, (usage, why)

    # The nodes share this disk: the activation cache was built once, by the first trial.
    caches = _finished_caches(Path(summary["cache_dir"]) / "activations")
    assert len(caches) == 1, caches

    # Checkpoint scratch folders live in the node's raysae cache, not in the trial folders
    # that Tune's driver-artifact sync uploads (the fake nodes share the driver's disk).
    scratch = [k for k in keys if "/.raysae-ckpt-" in k]
    assert not scratch, scratch[:3]


def test_jsonl_zst_folder_reads_the_text_field(corpus_dir):
    """A folder laid out like a hub dataset repo of .jsonl.zst files (the Pile's format) is
    read as JSON lines: documents are the records' "text", in both splits."""
    import zstandard

    from raysae.lm import corpus

    records = [json.loads(line) for f in sorted((corpus_dir / "train").glob("*.jsonl.zst"))
               for line in zstandard.ZstdDecompressor().stream_reader(f.open("rb"))
               .read().decode().splitlines()]
    texts = {r["text"] for r in records}
    for split in ("train", "heldout"):
        first = next(corpus.iter_texts(str(corpus_dir), split=split), None)
        assert first is not None, split
        assert first in texts, (split, first[:200])
