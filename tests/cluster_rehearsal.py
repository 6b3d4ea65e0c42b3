"""Multi-node rehearsal (issue 7), run in its own process by tests/test_multinode.py.

A ``ray.cluster_utils.Cluster`` on this machine: a head with no CPUs (it runs only the
driver: Tune + Optuna) and two 1-CPU workers, so the two 1-CPU trials of a 2-trial search
must land on different nodes. Once both trials have reported (and checkpointed), the worker
of one of them is removed and a replacement worker added, as an autoscaler would; Tune
restarts the lost trial from its checkpoint on the node that has room. The same search then
runs again with no node lost. The summary (nodes, the removed node, both trials tables'
paths) goes to a JSON file for the test to check.

Run with RAY_TMPDIR set to a private folder: the cluster then records its address there,
not in /tmp/ray, so no other process on the machine can attach to it by accident.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import pandas as pd

HOOK = "blocks.0.hook_resid_post"
CTX = 32
NODE_ARGS = {"object_store_memory": 80 * 1024**2}


def _rows(experiment: Path, which: int) -> dict[str, dict]:
    """trial folder name -> its first (0) or latest (-1) reported row, for trials that have
    reported."""
    rows = {}
    for result in experiment.glob("*/result.json"):
        lines = result.read_text().splitlines()
        try:
            rows[result.parent.name] = json.loads(lines[which])
        except (IndexError, json.JSONDecodeError):  # nothing yet, or a line being written
            continue
    return rows


def _wait_for_both_trials(experiment: Path, search: threading.Thread,
                          deadline: float) -> dict[str, dict]:
    while time.time() < deadline and search.is_alive():
        rows = _rows(experiment, 0)
        if len(rows) == 2 and all(r.get("node_id") for r in rows.values()):
            return rows
        time.sleep(0.2)
    raise RuntimeError("the two trials never both reported while the search ran")


def _replace_a_worker(cluster, experiment: Path, search: threading.Thread) -> dict:
    """Once both trials reported, remove one trial's node and add a fresh worker, as an
    autoscaler would. Runs in the main thread: Ray's Node installs signal handlers."""
    rows = _wait_for_both_trials(experiment, search, time.time() + 120)
    victim_trial, row = sorted(rows.items())[0]
    node = next(n for n in cluster.worker_nodes if n.node_id == row["node_id"])
    cluster.remove_node(node)
    step = _rows(experiment, -1)[victim_trial].get("step")
    replacement = cluster.add_node(num_cpus=1, **NODE_ARGS)
    return {"removed_node": node.node_id, "removed_trial": victim_trial,
            "removed_after_step": step, "replacement_node": replacement.node_id}


def _spec(model: str, cache: str):
    from search_helpers import make_spec

    # 200 steps with a checkpoint every 20: the node goes away mid-training.
    return make_spec(activations=cache, model=model, hook=HOOK, d_in=32, d_sae=128,
                     context_length=CTX, total_tokens=256 * 200, batch_size=256,
                     log_every=10, checkpoint_seconds=0, eval_blocks=8, feature_tokens=2000,
                     lambda_mode="search")


def run(model: str, workdir: Path) -> dict:
    import ray
    from ray.cluster_utils import Cluster
    from search_helpers import make_plan

    from raysae.activations.cache import build_cache
    from raysae.activations.source import ActivationSource
    from raysae.search.stages import run_search

    t0, seconds = time.perf_counter(), {}
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": False, **NODE_ARGS})
    try:
        workers = [cluster.add_node(num_cpus=1, **NODE_ARGS) for _ in range(2)]
        ray.init(address=cluster.address, log_to_driver=False)
        seconds["cluster_up"] = time.perf_counter() - t0
        src = ActivationSource(model=model, hook=HOOK, context_length=CTX, n_tokens=16_384,
                               num_actors=1)
        cache = build_cache(src, workdir / "acts", progress=False)
        seconds["cache_built"] = time.perf_counter() - t0
        settings = make_plan("mn", str(workdir / "tune"), _spec(model, str(cache)),
                             grid=({"p": 1.0, "lam": 1.0}, {"p": 0.5, "eps": 0.0, "lam": 1.0}),
                             max_concurrent=2, cpus_per_trial=1.0, max_failures=2)
        result: dict = {}

        def search() -> None:  # Tune runs fine outside the main thread
            try:
                result["out"] = run_search(settings, workdir / "results")
            except BaseException as exc:  # re-raised in the main thread
                result["error"] = exc

        experiment = workdir / "tune" / "mn"
        thread = threading.Thread(target=search, daemon=True)
        thread.start()
        log = {"workers": [w.node_id for w in workers], "head": cluster.head_node.node_id,
               **_replace_a_worker(cluster, experiment, thread)}
        thread.join()
        seconds["search_done"] = time.perf_counter() - t0
        if "error" in result:
            raise result["error"]
        trials = pd.read_parquet(result["out"] / "trials.parquet")
        whole = run_search(make_plan("mn", str(workdir / "tune-whole"), settings.spec,
                                     grid=settings.grid, max_concurrent=2),
                           workdir / "results-whole")  # the same search, no node lost
        seconds["uninterrupted_done"] = time.perf_counter() - t0
        log.update(trials=str(result["out"] / "trials.parquet"),
                   uninterrupted_trials=str(whole / "trials.parquet"),
                   first_nodes={k: r["node_id"] for k, r in _rows(experiment, 0).items()},
                   final_nodes=dict(zip(trials["trial_dir"].map(lambda p: Path(p).name),
                                        trials["node_id"])))
        return {**log, "seconds": seconds}
    finally:
        ray.shutdown()
        cluster.shutdown()
        seconds["shut_down"] = time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local model checkpoint folder")
    parser.add_argument("--workdir", required=True, type=Path, help="scratch folder")
    parser.add_argument("--summary", required=True, type=Path, help="JSON summary to write")
    args = parser.parse_args(argv)
    if not os.environ.get("RAY_TMPDIR"):
        parser.error("set RAY_TMPDIR to a private folder (the cluster records its address there)")
    summary = run(args.model, args.workdir)
    tmp = args.summary.with_name(f".{args.summary.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, args.summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
