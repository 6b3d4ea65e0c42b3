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
from search_helpers import assert_same_trials  # noqa: E402

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


@pytest.fixture(scope="module")
def fault_baseline(pythia_dir, corpus_dir, tmp_path_factory):
    """The fault scenarios' search on the cluster, never interrupted: what they reproduce."""
    return _finished_table(_run_rehearsal(pythia_dir, corpus_dir,
                                          tmp_path_factory.mktemp("baseline"),
                                          "fault-baseline"))


def _run_rehearsal(model: Path, corpus: Path, workdir: Path, scenario: str = "plain",
                   ) -> dict:
    """The rehearsal's summary; it ran with a private RAY_TMPDIR that nothing outlived."""
    ray_tmp = Path(os.path.realpath("/tmp")) / f"rsas-{os.getpid()}-{time.time_ns() % 10**6}"
    ray_tmp.mkdir()  # short: Ray's socket paths under it must stay < 108 characters
    summary = workdir / "summary.json"
    cmd = [sys.executable, str(ROOT / "tests" / "autoscaler_rehearsal.py"), "--model",
           str(model), "--corpus", str(corpus), "--workdir", str(workdir / "run"),
           "--summary", str(summary), "--timeout", str(JOB_TIMEOUT_S),
           "--gpus-per-trial", GPUS_PER_TRIAL, "--scenario", scenario]
    start = time.time()
    try:
        code, output, left = run_rehearsal(cmd, ray_tmp, TIMEOUT_S)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    data = json.loads(summary.read_text()) if summary.is_file() else {}
    print(f"autoscaler rehearsal ({scenario}): {time.time() - start:.0f} s; stages "
          "(cumulative s):", data.get("seconds"), "fault:",
          {k: v for k, v in data.get("fault", {}).items() if k != "before"})
    assert code == 0, f"{output[-4000:]}\n{_diagnosis(data)}"
    assert not left, f"processes of the rehearsal outlived it: {left}\n{_diagnosis(data)}"
    return data


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
    summary = _run_rehearsal(pythia_dir, corpus_dir, tmp_path)
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
    # The concurrency: what fits on the 2 workers the autoscaler may launch (1 CPU each).
    assert "up to 2 trials at once" in Path(summary["job_log"]).read_text(), why

    # The nodes share this disk: the activation cache was built once, by the first trial.
    caches = _finished_caches(Path(summary["cache_dir"]) / "activations")
    assert len(caches) == 1, caches

    # Checkpoint scratch folders live in the node's raysae cache, not in the trial folders
    # that Tune's driver-artifact sync uploads (the fake nodes share the driver's disk).
    scratch = [k for k in keys if "/.raysae-ckpt-" in k]
    assert not scratch, scratch[:3]


def _finished_table(summary: dict) -> pd.DataFrame:
    """The job's trials table, every trial finished, the cache built once."""
    why = _diagnosis(summary)
    assert not summary.get("job_timed_out"), f"the search ran past {JOB_TIMEOUT_S} s\n{why}"
    assert summary.get("job_rc") == 0, f"the search exited {summary.get('job_rc')}\n{why}"
    trials = pd.read_parquet(Path(summary["results"]) / "trials.parquet")
    bad = trials[trials["status"] != "finished"]
    assert bad.empty, (bad[["label", "stage", "status", "status_reason"]].to_string(), why)
    assert trials["trial_id"].is_unique
    assert set(trials["stage"]) == {"refs", "search"}
    caches = _finished_caches(Path(summary["cache_dir"]) / "activations")
    assert len(caches) == 1, caches
    return trials


def test_driver_killed_mid_search_resumes_from_s3(pythia_dir, corpus_dir, tmp_path,
                                                 fault_baseline):
    """The driver dies (SIGKILL) while a reference trial is training and another has
    finished, and the head's results folder goes with it; the same command with --resume,
    from S3 alone, keeps the finished trial's row as it was and restores the unfinished
    ones from their checkpoints in S3: the uninterrupted search's table, to 1e-6."""
    summary = _run_rehearsal(pythia_dir, corpus_dir, tmp_path, "driver-kill")
    why = _diagnosis(summary)
    fault = summary.get("fault", {})
    assert fault.get("before"), f"the job ended before the driver could be killed\n{why}"
    assert fault["killed_rc"] == -9, fault
    trials = _finished_table(summary)
    before = fault["before"]
    done = {t: b for t, b in before.items() if b["status"] == "finished"}
    running = {t: b for t, b in before.items() if b["status"] == "running"
               and (b["checkpoint_bytes"] or 0) > 0}
    assert done and running, before
    for tid, b in done.items():  # kept as they were, not trained again
        mine = trials[trials["tune_trial_id"] == tid]
        assert (mine["restored_from_step"] == 0).all(), mine.to_dict("records")
        assert mine["l0"].mean() == pytest.approx(b["l0"], rel=1e-6), (tid, b)
        assert (mine["node_id"] == b["node_id"]).all(), (tid, b)
    for tid in running:  # restored from its checkpoint in S3
        mine = trials[trials["tune_trial_id"] == tid]
        assert (mine["restored_from_step"] > 0).all(), (mine.to_dict("records"), why)
    assert_same_trials(trials, fault_baseline)


def test_terminated_worker_is_replaced_and_its_trial_resumes_from_s3(pythia_dir, corpus_dir,
                                                                     tmp_path, fault_baseline):
    """The provider terminates the worker node running a checkpointed trial (as a cloud
    console or a spot interruption would): the autoscaler launches another node, and Tune
    retries the trial from its checkpoint in S3 on a live node; its rows equal the
    uninterrupted search's to 1e-6."""
    summary = _run_rehearsal(pythia_dir, corpus_dir, tmp_path, "worker-kill")
    why = _diagnosis(summary)
    fault = summary.get("fault", {})
    assert fault.get("terminated"), f"no worker was terminated\n{why}"
    assert not fault["node_processes_left"], fault  # the node's processes are gone
    trials = _finished_table(summary)
    lost, tid = fault["node_id"], fault["trial_id"]
    rows = trials[trials["tune_trial_id"] == tid]
    assert (rows["restored_from_step"] > 0).all(), (rows.to_dict("records"), why)
    assert (rows["node_id"] != lost).all(), rows["node_id"].tolist()
    nodes = summary["nodes"]
    assert isinstance(nodes, list), nodes
    assert not any(n["NodeID"] == lost and n["Alive"] for n in nodes), nodes
    live = _workers(nodes)
    assert len(live) == MAX_WORKERS, (nodes, why)  # the lost one was replaced
    at_fault = {n["NodeID"] for n in fault["nodes_at_fault"]}
    replacement = {n["NodeID"] for n in live} - at_fault
    assert replacement, (at_fault, live)
    assert set(trials["node_id"]) & replacement, trials[["label", "node_id"]].to_string()
    assert_same_trials(trials, fault_baseline)


def test_live_search_on_an_autoscaling_cluster(pythia_dir, corpus_dir, tmp_path):
    """--live on the cluster: each trial runs the model on its own GPU share (no cache, no
    Ray Data pool asking for GPUs the trials hold), as many at once as the node types hold,
    every trial trained on its whole token budget."""
    summary = _run_rehearsal(pythia_dir, corpus_dir, tmp_path, "live")
    why = _diagnosis(summary)
    assert summary.get("job_rc") == 0, f"the search exited {summary.get('job_rc')}\n{why}"
    trials = pd.read_parquet(Path(summary["results"]) / "trials.parquet")
    assert (trials["status"] == "finished").all(), trials[["label", "status"]].to_string()
    assert (trials["tokens_seen"] == 4096).all(), trials["tokens_seen"].tolist()
    assert (trials["gpu_ids"].astype(str).str.strip() != "").all()
    assert set(trials["node_id"]) <= {n["NodeID"] for n in _workers(summary["nodes"])}
    assert not _finished_caches(Path(summary["cache_dir"]) / "activations")
    assert "up to 2 trials at once" in Path(summary["job_log"]).read_text(), why


HEAD_RESOURCE = "node:__internal_head__"
TERMINATED = re.compile(r"^(\S+ \S+),\d+\s.*Terminating the node with id (\S+) .*\(idle\)",
                        re.M)
RELEASED = re.compile(r"raysae: released the cluster at (\S+ \S+):")


def _staged_run(summary: dict) -> tuple[pd.DataFrame, list[dict], list[dict]]:
    """keep-nodes / lose-nodes: the job's table (every stage finished) and the worker nodes
    right after it, (alive, dead): ray.nodes() lists a removed node as dead, with no
    resources, so a worker is any node but the head."""
    why = _diagnosis(summary)
    assert not summary.get("job_timed_out"), f"the search ran past {JOB_TIMEOUT_S} s\n{why}"
    assert summary.get("job_rc") == 0, f"the search exited {summary.get('job_rc')}\n{why}"
    trials = pd.read_parquet(Path(summary["results"]) / "trials.parquet")
    assert {"refs", "search", "promote", "confirm"} <= set(trials["stage"]), why
    assert trials[trials["stage"] != "search"]["status"].eq("finished").all(), why
    nodes = summary["nodes"]
    assert isinstance(nodes, list), nodes
    workers = [n for n in nodes if HEAD_RESOURCE not in n["Resources"]]
    head = [n for n in nodes if HEAD_RESOURCE in n["Resources"]]
    assert len(head) == 1, nodes
    return (trials, [n for n in workers if n["Alive"]],
            [n for n in workers if not n["Alive"]])


def _idle_terminations(summary: dict) -> list[tuple[str, str]]:
    """(local time, node id) of every idle worker the autoscaler terminated, from its log."""
    logs = sorted(Path(summary["workdir"]).glob("monitor.*"))
    text = "\n".join(p.read_text(errors="replace") for p in logs) or summary[
        "autoscaler_log_tail"]
    return TERMINATED.findall(text)


def test_idle_workers_are_removed_between_stages_without_the_hold(pythia_dir, corpus_dir,
                                                                   tmp_path):
    """The control for the next test: with --no-keep-nodes, while the promotion trains one
    proposal on one worker for longer than the idle timeout, the other worker is removed
    (on a real cluster, with its activation cache) and the confirmation runs on a new one."""
    summary = _run_rehearsal(pythia_dir, corpus_dir, tmp_path, "lose-nodes")
    trials, alive, dead = _staged_run(summary)
    why = _diagnosis(summary)
    assert dead and _idle_terminations(summary), (
        f"no worker was removed: the rehearsal cannot see the loss\n{why}")
    used = {s: set(trials[trials["stage"] == s]["node_id"]) for s in ("refs", "confirm")}
    assert used["confirm"] - used["refs"], (used, why)  # a node launched after the loss
    assert "released the cluster" not in Path(summary["job_log"]).read_text()


def test_the_search_holds_its_workers_until_its_last_stage_ends(pythia_dir, corpus_dir,
                                                                tmp_path):
    """The same search with the hold (the default): the autoscaler terminates no worker
    before the search releases the hold after its last stage, every stage runs on the nodes
    the references ran on (their caches), and once released, the idle workers go."""
    summary = _run_rehearsal(pythia_dir, corpus_dir, tmp_path, "keep-nodes")
    trials, _alive, _dead = _staged_run(summary)
    why = _diagnosis(summary)
    log = Path(summary["job_log"]).read_text()
    assert "raysae: holding the cluster at 2 trial(s)" in log, why
    released = RELEASED.findall(log)
    assert len(released) == 1, (released, why)
    terminated = _idle_terminations(summary)
    early = [(t, node) for t, node in terminated if t < released[0]]
    assert not early, f"workers removed before the hold was released: {early}\n{why}"
    used = {s: set(trials[trials["stage"] == s]["node_id"]) for s in set(trials["stage"])}
    assert all(nodes <= used["refs"] for nodes in used.values()), (used, why)
    after = summary["nodes_after_release"]
    assert isinstance(after, list), after
    assert not [n for n in after if n["Alive"] and n["Resources"].get("GPU", 0) > 0], (
        f"the workers outlived the search's hold\n{why}")
    assert len(terminated) >= len(used["refs"]), (terminated, why)  # then they all went


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
