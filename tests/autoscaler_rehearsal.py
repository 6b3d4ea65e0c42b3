"""Autoscaler rehearsal (issue #23), run in its own process by tests/test_autoscaler.py.

The documented cluster run (docs/cluster.md) on this one machine:

- S3 is moto's server on 127.0.0.1 (a bucket made with boto3); every process gets the
  AWS_* variables, and AWS_ENDPOINT_URL points pyarrow's S3FileSystem (Tune's storage and
  raysae's fetch of artifacts) at it.
- The cluster is Ray's own autoscaler with its fake multi-node provider: a config written
  here (what `ray up` leaves on a head as ~/ray_bootstrap_config.yaml: a 0-CPU head type
  and a GPU worker type {CPU: 1, GPU: 1}, 0..2 of them) and `RAY_FAKE_CLUSTER=1 ray start
  --head --autoscaling-config ...`. The autoscaler launches worker nodes (raylets on this
  machine, sharing its disk) when trials ask for GPUs. `ray.cluster_utils.AutoscalingCluster`
  is not used: its start() runs `ray stop --force`, which kills every Ray on the machine.
- The search is the documented command, `python searches/exponent_search.py`, run "on the
  head" (its working folder stands for ~/raysae) with RAYSAE_STORAGE=s3://..., the
  autoscaler config in RAYSAE_AUTOSCALER_CONFIG, and small token counts.

Scenarios (--scenario): ``plain`` runs the search once; ``live`` runs it with --live (no
cache: each trial runs the model on its own GPU share); ``fault-baseline`` runs the fault
scenarios' search with no fault (what they must reproduce). ``driver-kill`` SIGKILLs the
driver once a reference trial has finished and another has a checkpoint in S3 (and the
experiment state was synced after it), deletes the head's local results folder (a new
head), then runs the same command with --resume. ``worker-kill``
has the provider terminate the worker node running a trial that has a checkpoint in S3 (as
a cloud console or a spot interruption would; see PROVIDER): the autoscaler launches a
replacement, and Tune retries the trial from its checkpoint. Both fault scenarios train
longer and checkpoint every few seconds, so the fault lands mid-trial; what the driver had
seen before the fault goes into the summary. ``keep-nodes`` and ``lose-nodes`` run a search
whose promotion keeps one worker busy for longer than the autoscaler's idle timeout (12 s
here) between stages that use both: with the driver holding the cluster's size (the
default) no worker is removed until the search ends, and then both go; ``lose-nodes`` runs
it with --no-keep-nodes, where the idle worker is removed and another launched later.

Everything runs with RAY_TMPDIR (and --temp-dir) set to a private folder, which also marks
every process this rehearsal starts: they are stopped by that mark (SIGTERM, then SIGKILL),
never with `ray stop` (which stops every Ray process on the machine). The summary (job exit
status and log tail, `ray status`, the nodes, folders, timings) goes to a JSON file for the
test to check; the script exits 0 whenever it could run the rehearsal, even if the job
failed (the test reports the job's own failure).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from isolated import pids_using  # noqa: E402
from rehearsal_provider import NODE_ENV  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "raysae-rehearsal"
PREFIX = "raysae"
WORKER_TYPE = "ray.worker.gpu"
WORKER_RESOURCES = {"CPU": 1, "GPU": 1}
MAX_WORKERS = 2
OBJECT_STORE = 100 * 1024**2
JOB_NAME = "exponent_search"
TAIL = 8000
SCENARIOS = ("plain", "live", "fault-baseline", "driver-kill", "worker-kill", "keep-nodes",
             "lose-nodes")
STAGED_ARGS = ["--total-tokens", "393216", "--expansion", "2", "--log-every", "4",
               "--num-trials", "2", "--promote", "1", "--rung", "0.25", "--seeds", "2"]
"""keep-nodes / lose-nodes: a search whose stages need different node counts (references
on both workers, one promoted proposal on one, the confirmation on both again), under an
idle timeout (IDLE_MINUTES) well under the promotion (which took 24 s at 262144 tokens on a
2-core Xeon: too close to a 30 s timeout for the loss to show)."""
IDLE_MINUTES = 0.2
RELEASE_WAIT_S = 150
"""keep-nodes: how long to wait after the job for the released workers to be removed."""
FAULT_ARGS = ["--total-tokens", "131072", "--expansion", "2", "--log-every", "4",
              "--checkpoint-seconds", "4", "--max-failures", "3"]
"""Fault scenarios: trials of ~128 steps with a checkpoint every ~4 s, so a fault lands
mid-trial with a checkpoint to resume from (later flags override the plain command's)."""
PROVIDER = "rehearsal_provider.TerminableFakeProvider"
"""worker-kill's provider: the fake one, plus termination requested from outside (a file
per node id; see tests/rehearsal_provider.py), as a cloud console terminates an instance."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_corpus(folder: str | os.PathLike, n_files: int = 10, docs_per_file: int = 12,
                 max_chars: int = 6000) -> Path:
    """A small text corpus laid out like a hub dataset repo of the Pile's kind:
    ``folder/train/NN.jsonl.zst``, zstd-compressed JSON lines ``{"text": ..., "meta": ...}``
    (text: the Python standard library's sources). Returns ``folder``."""
    import zstandard

    from raysae.lm import corpus

    folder = Path(folder)
    (folder / "train").mkdir(parents=True, exist_ok=True)
    sources = corpus.stdlib_files()[: n_files * docs_per_file]
    for i in range(n_files):
        docs = [{"text": p.read_text(errors="replace")[:max_chars],
                 "meta": {"pile_set_name": "stdlib", "file": p.name}}
                for p in sources[i::n_files]]
        data = "".join(json.dumps(d) + "\n" for d in docs).encode()
        (folder / "train" / f"{i:02d}.jsonl.zst").write_bytes(
            zstandard.ZstdCompressor(level=3).compress(data))
    return folder


def autoscaler_config(gcs_address: str, terminate_dir: Path | None = None,
                      idle_minutes: float = 60) -> dict:
    """The autoscaling config for the fake multi-node provider, complete (the autoscaler
    reads it as it is: the wheel has no fake_multi_node/example.yaml to fill defaults from).
    The head type must be named ray.head.default (the fake provider's head node type).
    ``idle_minutes``: 60 keeps workers up until the test stops the cluster."""
    return {
        "cluster_name": "raysae-rehearsal",
        "max_workers": MAX_WORKERS,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_minutes,
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address,
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True,
                     **({"type": "external", "module": PROVIDER,
                         "terminate_dir": str(terminate_dir)} if terminate_dir else {})},
        "auth": {},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {"resources": {**WORKER_RESOURCES, "object_store_memory": OBJECT_STORE},
                          "node_config": {}, "min_workers": 0, "max_workers": MAX_WORKERS},
        },
        "head_node_type": "ray.head.default",
        "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return "?"


def stop_marked(marker: str, grace: float = 15.0) -> list[str]:
    """SIGTERM every process marked with ``marker``, SIGKILL what is left after ``grace``
    seconds; returns "pid command" of those that needed SIGKILL."""
    for pid in pids_using(marker):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.time() + grace
    while pids_using(marker) and time.time() < deadline:
        time.sleep(0.5)
    left = [(pid, _name(pid)) for pid in pids_using(marker)]
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return [f"{pid} {name}" for pid, name in left]


def start_moto(env: dict, port: int, log: Path) -> subprocess.Popen:
    import boto3

    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H",
                               "127.0.0.1", "-p", str(port)], env=env, stdout=log.open("wb"),
                              stderr=subprocess.STDOUT)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    deadline = time.monotonic() + 60
    while True:
        try:
            client.create_bucket(Bucket=BUCKET)
            return server
        except Exception as err:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not come up: "
                                   f"{log.read_text()[-2000:]}") from err
            time.sleep(0.3)


def s3_keys(env: dict) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def start_head(env: dict, config: Path, ray_tmp: Path, ports: dict, log: Path,
               terminable: bool = False) -> None:
    """`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config ...`, every port chosen
    here (no Ray default port that another Ray on the machine may hold)."""
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head",
           f"--autoscaling-config={config}", f"--temp-dir={ray_tmp}",
           "--node-ip-address=127.0.0.1", f"--port={ports['gcs']}", "--num-cpus=0",
           "--num-gpus=0", f"--object-store-memory={OBJECT_STORE}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
           f"--dashboard-agent-listen-port={ports['agent']}",
           f"--ray-client-server-port={ports['client']}",
           f"--metrics-export-port={ports['metrics']}", "--disable-usage-stats"]
    head_env = {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                "AUTOSCALER_METRIC_PORT": str(ports["autoscaler_metrics"])}
    if terminable:  # the monitor imports rehearsal_provider from this folder
        head_env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(__file__).resolve().parent), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with log.open("ab") as out:
        subprocess.run(cmd, env=head_env, stdout=out, stderr=subprocess.STDOUT, check=True,
                       timeout=180)


def ray_status(env: dict, address: str) -> str:
    try:
        out = subprocess.run([str(Path(sys.executable).with_name("ray")), "status",
                              f"--address={address}"], env=env, capture_output=True,
                             text=True, timeout=60)
        return out.stdout + out.stderr
    except subprocess.TimeoutExpired:
        return "[ray status timed out]"


NODES = """
import json, ray
ray.init(address={address!r}, log_to_driver=False)
keys = ("NodeID", "Alive", "Resources", "NodeManagerAddress")
print("NODES", json.dumps([{{k: n[k] for k in keys}} for n in ray.nodes()]))
ray.shutdown()
"""


def cluster_nodes(env: dict, address: str) -> list[dict] | str:
    """ray.nodes() of the cluster (dead nodes too), from a short-lived driver."""
    try:
        out = subprocess.run([sys.executable, "-c", NODES.format(address=address)], env=env,
                             capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "[listing the nodes timed out]"
    for line in out.stdout.splitlines():
        if line.startswith("NODES "):
            return json.loads(line[6:])
    return (out.stdout + out.stderr)[-3000:]


def wait_for_no_workers(env: dict, address: str, timeout: float) -> list[dict] | str:
    """ray.nodes() once no worker is alive, or as it is after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = cluster_nodes(env, address)
        alive = [n for n in nodes if n["Alive"] and n["Resources"].get("GPU", 0) > 0] \
            if isinstance(nodes, list) else [None]
        if not alive or time.monotonic() > deadline:
            return nodes
        time.sleep(5)


def search_command(model: str, corpus: str, address: str, gpus_per_trial: str | None) -> list:
    """The documented command with small amounts (the study's shape: d_sae = 4 x 512)."""
    cmd = [sys.executable, str(ROOT / "searches" / "exponent_search.py"),
           "--model", model, "--corpus", corpus, "--address", address,
           "--targets", "8", "16", "--num-trials", "2", "--seeds", "0", "--baselines", "topk",
           "--cache-tokens", "8192", "--total-tokens", "4096", "--batch-size", "1024",
           "--log-every", "1", "--eval-blocks", "2", "--feature-tokens", "2048"]
    if gpus_per_trial:
        cmd += ["--gpus-per-trial", gpus_per_trial]
    return cmd


def run_job(cmd: list, env: dict, cwd: Path, log: Path, timeout: float) -> tuple[int, bool]:
    """(exit status, timed out). The job gets its own process group, killed on timeout."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return proc.returncode, True


def driver_rows(ray_tmp: Path, stage: str) -> dict[str, list[dict]]:
    """Each trial's rows the driver has received so far (its staging copy of result.json,
    under the cluster's temp folder), by trial id."""
    out: dict[str, list[dict]] = {}
    pattern = f"session_*/artifacts/*/{JOB_NAME}_{stage}/driver_artifacts/*/result.json"
    for path in ray_tmp.glob(pattern):
        rows = []
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
        if rows:
            out[rows[-1]["trial_id"]] = rows
    return out


def last_state(rows: dict[str, list[dict]]) -> dict[str, dict]:
    keys = ("status", "step", "ce_sae", "l0", "node_id", "checkpoint_bytes", "label")
    return {tid: {k: r[-1].get(k) for k in keys} for tid, r in rows.items()}


def local_state(ray_tmp: Path, stage: str) -> Path | None:
    """The driver's own copy of the stage's experiment state (it uploads this folder)."""
    found = sorted(ray_tmp.glob(f"session_*/artifacts/*/{JOB_NAME}_{stage}/driver_artifacts/"
                                "experiment_state-*.json"))
    return found[-1] if found else None


def s3_state(env: dict, stage: str) -> bytes | None:
    """The stage's experiment state as uploaded to S3 (what --resume restores from)."""
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    listed = client.list_objects_v2(Bucket=BUCKET,
                                    Prefix=f"{PREFIX}/{JOB_NAME}_{stage}/experiment_state")
    keys = sorted(o["Key"] for o in listed.get("Contents", []))
    return client.get_object(Bucket=BUCKET, Key=keys[-1])["Body"].read() if keys else None


def checkpointed_running(rows: dict[str, list[dict]]) -> dict[str, dict]:
    """Trials still training whose driver has a checkpoint of them (in S3: a report with a
    checkpoint returns once it is uploaded)."""
    return {tid: r[-1] for tid, r in rows.items()
            if r[-1].get("status") == "running" and (r[-1].get("checkpoint_bytes") or 0) > 0}


def terminate_node(node_id: str, terminate_dir: Path, timeout: float = 60) -> bool:
    """Ask the provider to terminate ``node_id`` (see tests/rehearsal_provider.py); True
    once it has (within ``timeout`` seconds)."""
    (terminate_dir / node_id).touch()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (terminate_dir / f"{node_id}.done").exists():
            return True
        time.sleep(0.2)
    return False


def processes_left(marker: str, timeout: float = 15) -> list[int]:
    """The terminated node's processes still alive after ``timeout`` s: the provider kills
    the node's raylet at once, its workers exit within seconds (at load 2 on 2 cores one
    was seen alive right after the provider reported the node done)."""
    deadline = time.monotonic() + timeout
    while (left := pids_using(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def inject_fault(proc: subprocess.Popen, scenario: str, env: dict, ray_tmp: Path,
                 fault: dict, deadline: float, address: str, terminate_dir: Path | None,
                 ) -> bool:
    """Wait until the fault can land mid-trial (a reference trial with a checkpoint in S3;
    driver-kill also wants a finished one and the experiment state synced since), inject
    it, record what the driver had seen in ``fault``; False if the job ended first."""
    start, armed_at, snapshots, armed_for = time.monotonic(), None, set(), set()
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
        rows = driver_rows(ray_tmp, "refs")
        running = checkpointed_running(rows)
        finished = [t for t, r in rows.items() if r[-1].get("status") == "finished"]
        if armed_at and set(running) != armed_for:
            # another trial's first checkpoint (or one finished): the state to restore from
            # must post-date every checkpoint the test will look for, so wait for a newer one
            armed_at, snapshots = None, set()
            fault["rearmed"] = fault.get("rearmed", 0) + 1
        if scenario == "worker-kill" and running:
            tid, row = sorted(running.items())[0]
            fault.update(trial_id=tid, node_id=row["node_id"], before=last_state(rows),
                         at_s=time.monotonic() - start)
            fault["terminated"] = terminate_node(row["node_id"], terminate_dir)
            fault["node_processes_left"] = processes_left(f"{NODE_ENV}={row['node_id']}")
            fault["nodes_at_fault"] = cluster_nodes(env, address)
            return True
        if scenario == "driver-kill" and (armed_at or running and finished):
            # Kill once S3 holds an experiment state the driver saved after it had seen a
            # checkpoint of a running trial (that state is what --resume restores).
            if armed_at is None:
                armed_at, armed_for = time.time(), set(running)
            state = local_state(ray_tmp, "refs")
            with contextlib.suppress(OSError):
                if state is not None and state.stat().st_mtime > armed_at:
                    snapshots.add(state.read_bytes())
            if snapshots and s3_state(env, "refs") in snapshots:
                now = driver_rows(ray_tmp, "refs")
                if not (checkpointed_running(now) and set(checkpointed_running(now)) == armed_for
                        and any(r[-1].get("status") == "finished" for r in now.values())):
                    # The running trial finished while the state synced: wait for the
                    # next finished/running pair (the next trials) and a state after it.
                    armed_at, snapshots = None, set()
                    fault["rearmed"] = fault.get("rearmed", 0) + 1
                    continue
                fault.update(before=last_state(now), at_s=time.monotonic() - start,
                             armed_s=time.time() - armed_at)
                os.killpg(proc.pid, signal.SIGKILL)
                fault["killed_rc"] = proc.wait()
                return True
    return False


def run_job_with_fault(cmd: list, env: dict, cwd: Path, log: Path, timeout: float,
                       scenario: str, ray_tmp: Path, fault: dict,
                       terminate_dir: Path | None = None) -> tuple[int, bool]:
    """Run the job with ``scenario``'s fault; (exit status, timed out) of the job, for
    driver-kill of the resumed one (its output in ``log`` with a .resume suffix)."""
    deadline = time.monotonic() + timeout
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        injected = inject_fault(proc, scenario, env, ray_tmp, fault, deadline,
                                cmd[cmd.index("--address") + 1], terminate_dir)
        if injected and scenario == "driver-kill":  # a new head: nothing but the storage
            shutil.rmtree(cwd / "results", ignore_errors=True)
        if not (injected and scenario == "driver-kill"):
            try:
                return proc.wait(timeout=max(deadline - time.monotonic(), 1)), False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                return proc.wait(), True
    return run_job(cmd + ["--resume"], env, cwd, log.with_suffix(".resume.log"),
                   max(deadline - time.monotonic(), 1))


def run(model: str, corpus: str, workdir: Path, timeout: float,
        gpus_per_trial: str | None, summary: dict, scenario: str = "plain") -> dict:
    """The rehearsal; fills ``summary`` as it goes (also when it breaks) and returns it."""
    ray_tmp = Path(os.environ["RAY_TMPDIR"]).resolve()
    marker = str(ray_tmp)
    t0, seconds = time.perf_counter(), {}
    ports = {k: free_port() for k in ("s3", "gcs", "dashboard", "agent", "client", "metrics",
                                      "autoscaler_metrics")}
    gcs = f"127.0.0.1:{ports['gcs']}"
    head_home = workdir / "head"  # stands for the head's ~/raysae (the job's working folder)
    head_home.mkdir(parents=True, exist_ok=True)
    config = workdir / "ray_bootstrap_config.yaml"  # what `ray up` leaves on the head
    import yaml

    terminate_dir = workdir / "terminate-requests" if scenario == "worker-kill" else None
    if terminate_dir:
        terminate_dir.mkdir(exist_ok=True)
    staged = scenario in ("keep-nodes", "lose-nodes")
    config.write_text(yaml.safe_dump(autoscaler_config(
        gcs, terminate_dir, IDLE_MINUTES if staged else 60), sort_keys=False))
    token = workdir / "auth_token"  # a private token: the documented cluster runs token mode
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**os.environ,
           "RAY_TMPDIR": marker, "RAY_ADDRESS": "", "RAYSAE_RAY_ADDRESS": "",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3']}",
           "RAYSAE_STORAGE": f"s3://{BUCKET}/{PREFIX}",
           "RAYSAE_AUTOSCALER_CONFIG": str(config),
           "RAYSAE_CACHE_DIR": str(workdir / "raysae-cache"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_AUTH_TOKEN", None)
    job_log, ray_log = workdir / "job.log", workdir / "ray_start.log"
    summary.update(address=gcs, config=str(config), workdir=str(workdir),
                   cache_dir=env["RAYSAE_CACHE_DIR"], storage=env["RAYSAE_STORAGE"],
                   job_log=str(job_log), seconds=seconds)
    moto = None
    try:
        moto = start_moto(env, ports["s3"], workdir / "moto.log")
        seconds["s3_up"] = time.perf_counter() - t0
        start_head(env, config, ray_tmp, ports, ray_log, terminate_dir is not None)
        seconds["head_up"] = time.perf_counter() - t0
        summary["nodes_before"] = cluster_nodes(env, gcs)
        cmd = search_command(model, corpus, gcs, gpus_per_trial)
        if scenario == "live":
            cmd += ["--live"]
        elif staged:
            cmd += STAGED_ARGS + (["--no-keep-nodes"] if scenario == "lose-nodes" else [])
        elif scenario != "plain":
            cmd += FAULT_ARGS
        summary.update(command=cmd, scenario=scenario)
        if scenario in ("plain", "live", "fault-baseline", "keep-nodes", "lose-nodes"):
            rc, timed_out = run_job(cmd, env, head_home, job_log, timeout)
        else:
            fault: dict = {}
            summary["fault"] = fault
            rc, timed_out = run_job_with_fault(cmd, env, head_home, job_log, timeout,
                                               scenario, ray_tmp, fault, terminate_dir)
        seconds["search_done"] = time.perf_counter() - t0
        summary.update(job_rc=rc, job_timed_out=timed_out,
                       results=str(head_home / "results" / JOB_NAME / "analysis"))
        summary["ray_status"] = ray_status(env, gcs)
        summary["nodes"] = cluster_nodes(env, gcs)
        if scenario == "keep-nodes":  # the hold is released: idle workers now go
            summary["nodes_after_release"] = wait_for_no_workers(env, gcs, RELEASE_WAIT_S)
            seconds["released"] = time.perf_counter() - t0
        summary["s3_keys"] = s3_keys(env)
        summary["local_results_tree"] = sorted(
            str(p.relative_to(head_home)) for p in head_home.rglob("*") if p.is_dir())
    except Exception as exc:  # the rehearsal itself broke: report it with what is known
        summary["error"] = f"{type(exc).__name__}: {exc}"
        summary.setdefault("ray_status", ray_status(env, gcs))
        raise
    finally:
        summary["job_log_tail"] = job_log.read_text(errors="replace")[-TAIL:] \
            if job_log.exists() else ""
        resumed = job_log.with_suffix(".resume.log")
        if resumed.exists():
            summary["resume_log"] = str(resumed)
            summary["job_log_tail"] = ("[first run]\n" + summary["job_log_tail"][-TAIL // 2:]
                                       + "\n[resumed run]\n"
                                       + resumed.read_text(errors="replace")[-TAIL // 2:])
        summary["ray_start_log_tail"] = ray_log.read_text(errors="replace")[-3000:] \
            if ray_log.exists() else ""
        summary["autoscaler_log_tail"] = _autoscaler_log(ray_tmp)
        for log in ray_tmp.glob("session_*/logs/monitor.*"):  # kept for a post-mortem
            with contextlib.suppress(OSError):
                (workdir / log.name).write_bytes(log.read_bytes())
        summary["killed_after_grace"] = stop_marked(marker)
        if moto is not None and moto.poll() is None:
            moto.kill()
            moto.wait()
        seconds["shut_down"] = time.perf_counter() - t0
    return summary


def _autoscaler_log(ray_tmp: Path) -> str:
    """The autoscaler's own events from its log (monitor.log): launches, terminations,
    warnings and errors (not its status table, repeated every second)."""
    logs = sorted(ray_tmp.glob("session_*/logs/monitor.log"))
    if not logs:
        return ""
    keep = ("launch", "Adding", "Terminat", "ERROR", "WARNING", "Traceback", "Error",
            "StandardAutoscaler", "node_provider", "fake")
    lines = [line for line in logs[-1].read_text(errors="replace").splitlines()
             if any(k in line for k in keep)]
    return "\n".join(lines)[-4000:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local model checkpoint folder")
    parser.add_argument("--corpus", required=True, help="corpus folder (see write_corpus)")
    parser.add_argument("--workdir", required=True, type=Path, help="scratch folder")
    parser.add_argument("--summary", required=True, type=Path, help="JSON summary to write")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for the search")
    parser.add_argument("--gpus-per-trial", default="",
                        help="passed to the search (default '': the job's own default)")
    parser.add_argument("--scenario", choices=SCENARIOS, default="plain",
                        help="the fault to inject mid-search (see the module's docstring)")
    args = parser.parse_args(argv)
    tmp = os.environ.get("RAY_TMPDIR")
    if not tmp or Path(tmp).resolve() == Path("/tmp/ray") or not Path(tmp).is_dir():
        parser.error("set RAY_TMPDIR to a private, existing folder (it marks every process "
                     "of the rehearsal, and the cluster records its address there)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    try:
        run(args.model, args.corpus, args.workdir.resolve(), args.timeout,
            args.gpus_per_trial or None, summary, args.scenario)
        return 0
    finally:
        out = args.summary.with_name(f".{args.summary.name}.tmp")
        out.write_text(json.dumps(summary, indent=2, default=str))
        os.replace(out, args.summary)


if __name__ == "__main__":
    sys.exit(main())
