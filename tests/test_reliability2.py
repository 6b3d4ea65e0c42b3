"""Reliability, second round (issue 17): Ctrl-C/SIGTERM, search names, impossible resources,
sizes, resume with changed settings, errors that cannot heal, and the smaller items.

Each test fails on the code as it was before the issue: the search went on after Ctrl-C and
exited 0, `--name ..` escaped --storage, impossible resources hung, sizes crashed late,
`--resume` took changed flags silently, a corrupt shard was retried by Tune."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from raysae import cli
from raysae.activations.cache import build_cache, default_cache_root
from raysae.activations.source import ActivationSource
from raysae.core.metrics import metric_names

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.0.hook_resid_post"
ENV = {**os.environ, "RAY_ADDRESS": "", "RAYSAE_RAY_ADDRESS": "", "HF_HUB_OFFLINE": "1"}


def _base(model, tmp_path, *extra):
    return ["--model", str(model), "--hook", HOOK, "--context-length", "32", "--targets", "8",
            "--num-trials", "1", "--seeds", "0", "--total-tokens", "4096",
            "--cache-tokens", "2048", "--batch-size", "256",
            "--storage", str(tmp_path / "tune"), "--results", str(tmp_path / "results"),
            "--no-report", *extra]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1 and err[-1] == errors[0], err
    return errors[0]


def _nothing_written(tmp_path) -> None:
    assert not (tmp_path / "results").exists() and not (tmp_path / "tune").exists()


# --- names ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["..", "../../escape_attempt", "a/b", "/tmp/abs_name", "",
                                  ".", ".hidden", "bad name"])
def test_name_must_be_one_folder_name(name, tiny_model_dir, tmp_path, capsys):
    argv = ["--model", str(tiny_model_dir), "--hook", HOOK, "--context-length", "32",
            "--targets", "8", "--storage", str(tmp_path / "st" / "tune"), "--no-report",
            "--name", name]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli.main(["search", *argv]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"raysae search: error: --name {name!r} is invalid: a search name "
                           "is one folder name: letters, digits"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written anywhere


def test_valid_names_pass():
    from raysae.search.config import job_config

    for name in ("exp1", "my.search-2_b", "A" * 100):
        assert job_config(name=name).run.name == name


# --- sizes and smaller bad inputs (before Ray starts) -------------------------------------

def test_context_length_above_model_maximum(tiny_model_dir, tmp_path, capsys):
    before = sorted(p.name for p in default_cache_root().glob("*")) \
        if default_cache_root().exists() else []
    argv = _base(tiny_model_dir, tmp_path)
    argv[argv.index("--context-length") + 1] = "100000"
    start = time.time()
    assert cli.main(["search", *argv]) == 2
    line = _error_line(capsys)
    assert line == (f"raysae search: error: --context-length 100000 is larger than the model's "
                    f"maximum of 32 positions ({tiny_model_dir}); pass --context-length 32 or "
                    "less"), line
    assert time.time() - start < 60
    _nothing_written(tmp_path)
    after = sorted(p.name for p in default_cache_root().glob("*")) \
        if default_cache_root().exists() else []
    assert after == before  # no .partial cache


def test_seed_negative_refused_before_ray(tiny_model_dir, tmp_path, capsys):
    assert cli.main(["search", *_base(tiny_model_dir, tmp_path, "--seed", "-1")]) == 2
    assert "--seed -1 is invalid: must be an integer >= 0" in _error_line(capsys)
    _nothing_written(tmp_path)


def test_binary_corpus_is_not_a_text_file(tiny_model_dir, tmp_path, capsys):
    assert cli.main(["search", *_base(tiny_model_dir, tmp_path, "--corpus", "/bin/ls")]) == 2
    line = _error_line(capsys)
    assert "--corpus /bin/ls is not a text file (not UTF-8" in line, line
    assert "codec" not in line
    _nothing_written(tmp_path)


def test_ablation_on_missing_folder(tmp_path, capsys):
    assert cli.main(["ablation", str(tmp_path / "no_sae")]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"raysae ablation: error: {tmp_path / 'no_sae'}: no such folder"), line
    assert not (tmp_path / "no_sae").exists()


def test_refused_input_stderr_is_one_line(tiny_model_dir, tmp_path):
    """The model is loaded (hook check) before the refusal: no progress bar on stderr."""
    out = subprocess.run([sys.executable, "-m", "raysae", "search",
                          *_base(tiny_model_dir, tmp_path), "--hook", "blocks.0.hook_resid_pots"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raysae search: error: --hook "), lines


def test_unreachable_address_leaves_no_results_folder(tiny_model_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "raysae", "search",
                          *_base(tiny_model_dir, tmp_path), "--address", "127.0.0.1:1"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(
        "raysae search: error: no Ray cluster answers at '127.0.0.1:1'"), out.stderr[-2000:]
    _nothing_written(tmp_path)


# --- resources and memory (after Ray starts, before any work) -----------------------------

@pytest.mark.parametrize("extra, phrases", [
    (["--cpus-per-trial", "1000"], ["--cpus-per-trial 1000 asks for 1000 CPUs per trial, but "
                                    "the largest node of the Ray cluster", "has 2; no trial "
                                    "could ever start"]),
    (["--gpus-per-trial", "1"], ["--gpus-per-trial 1 asks for 1 GPUs per trial, but no node "
                                 "of the Ray cluster", "has a GPU; no trial could ever start"]),
    (["--expansion", "100000", "--targets", "8", "16"],
     ["one trial needs about", "GiB of memory", "lower --expansion"]),
])
def test_impossible_trial_refused(extra, phrases, tiny_model_dir, ray_local, tmp_path, capsys,
                                  monkeypatch):
    import ray

    monkeypatch.setenv("RAYSAE_AUTOSCALER_CONFIG", str(tmp_path / "none.yaml"))
    if extra[0] == "--gpus-per-trial" and ray.cluster_resources().get("GPU"):
        pytest.skip("this machine has a GPU")
    argv = _base(tiny_model_dir, tmp_path)
    if "--targets" in extra:
        i = argv.index("--targets")
        del argv[i:i + 2]
    before = sorted(default_cache_root().glob("*")) if default_cache_root().exists() else []
    start = time.time()
    assert cli.main(["search", *argv, *extra]) == 2
    line = _error_line(capsys)
    for phrase in phrases:
        assert phrase in line, (phrase, line)
    assert time.time() - start < 60  # refused, not pending forever
    _nothing_written(tmp_path)
    after = sorted(default_cache_root().glob("*")) if default_cache_root().exists() else []
    assert after == before  # no cache built


def test_autoscaler_node_types_count(tmp_path, monkeypatch):
    from raysae.search.capacity import check_cluster

    nodes = [{"Alive": True, "Resources": {"CPU": 2.0, "memory": 4e9}}]
    config = tmp_path / "cluster.yaml"
    config.write_text("available_node_types:\n  big:\n    resources: {CPU: 64, GPU: 8}\n")
    monkeypatch.setenv("RAYSAE_AUTOSCALER_CONFIG", str(config))
    check_cluster(nodes, cpus=32, gpus=1, memory=10**6)  # the cluster can launch such a node
    with pytest.raises(ValueError, match="asks for 100 CPUs.*has 64"):
        check_cluster(nodes, cpus=100, gpus=0, memory=10**6)
    config.write_text("available_node_types:\n  auto:\n    node_config: {}\n")
    check_cluster(nodes, cpus=1000, gpus=4, memory=10**6)  # sizes unknown: not refused


def test_gpu_share_comes_from_the_node_types_the_autoscaler_can_launch(tmp_path, monkeypatch):
    """On the documented cluster no GPU node is alive when the driver starts; trials must
    still ask for a GPU share (issue 23)."""
    from raysae.search.capacity import GPU_SHARE, default_gpus_per_trial

    monkeypatch.setenv("RAYSAE_AUTOSCALER_CONFIG", str(tmp_path / "none.yaml"))
    assert default_gpus_per_trial({"CPU": 0.0}) == 0.0
    assert default_gpus_per_trial({"CPU": 4.0, "GPU": 1.0}) == GPU_SHARE
    config = tmp_path / "cluster.yaml"
    config.write_text("available_node_types:\n  head: {resources: {CPU: 0}}\n"
                      "  gpu: {resources: {CPU: 1, GPU: 1}, min_workers: 0}\n")
    monkeypatch.setenv("RAYSAE_AUTOSCALER_CONFIG", str(config))
    assert default_gpus_per_trial({"CPU": 0.0}) == GPU_SHARE
    config.write_text("available_node_types:\n  cpu: {resources: {CPU: 8}}\n")
    assert default_gpus_per_trial({"CPU": 0.0}) == 0.0


def test_concurrency_comes_from_the_cluster_at_its_largest(tmp_path, monkeypatch):
    """The documented cluster (0-CPU head, up to 4 workers of {CPU: 4, GPU: 1}) runs 16
    trials of 1 CPU and 0.25 GPU at once, though none of its workers is alive at start."""
    from pathlib import Path

    from raysae.search.capacity import default_concurrency, trials_per_node

    assert trials_per_node({"CPU": 4, "GPU": 1}, 1, 0.25) == 4
    assert trials_per_node({"CPU": 4, "GPU": 1}, 1, 0.3) == 3
    assert trials_per_node({"CPU": 2}, 1, 0) == 2
    assert trials_per_node({"CPU": 0}, 1, 0) == 0
    head = [{"Alive": True, "Resources": {"CPU": 0.0}}]
    monkeypatch.setenv("RAYSAE_AUTOSCALER_CONFIG", str(tmp_path / "none.yaml"))
    assert default_concurrency([{"Alive": True, "Resources": {"CPU": 2.0}}], 1, 0) == 2
    assert default_concurrency(head, 1, 0) == 1  # nothing fits: still one at a time
    monkeypatch.setenv("RAYSAE_AUTOSCALER_CONFIG",
                       str(Path(__file__).resolve().parents[1] / "cluster.yaml"))
    assert default_concurrency(head, 1, 0.25) == 16
    assert default_concurrency(head, 2, 0.25) == 8  # CPUs bind first
    config = tmp_path / "cluster.yaml"
    config.write_text("max_workers: 3\nhead_node_type: h\navailable_node_types:\n"
                      "  h: {resources: {CPU: 2}}\n"
                      "  small: {resources: {CPU: 1, GPU: 1}, max_workers: 5}\n"
                      "  big: {resources: {CPU: 8, GPU: 4}, max_workers: 2}\n")
    monkeypatch.setenv("RAYSAE_AUTOSCALER_CONFIG", str(config))
    # the cap of 3 workers: 2 big (4 each at 1 GPU) and 1 small; the head has no GPU
    assert default_concurrency(head, 1, 1) == 2 * 4 + 1
    assert default_concurrency(head, 1, 0) == 2 + 2 * 8 + 1  # CPU-only trials: head too


# --- resume with changed settings ---------------------------------------------------------

def test_resume_with_changed_settings_is_refused(tiny_model_dir, tmp_path, capsys):
    from raysae.search import stored
    from raysae.search.config import job_config

    argv = _base(tiny_model_dir, tmp_path, "--targets", "16", "32", "--name", "s")
    cfg = job_config(model=str(tiny_model_dir), hook=HOOK, context_length=32,
                     targets=(16.0, 32.0), num_trials=1, seeds=0, total_tokens=4096,
                     cache_tokens=2048, batch_size=256, storage=str(tmp_path / "tune"),
                     results=str(tmp_path / "results"), report=False, name="s")
    path = Path(stored.store(cfg, "s", False))
    assert path == tmp_path / "tune" / "s" / "job_settings.json"
    before = path.read_bytes()
    assert cli.main(["search", *argv, "--resume", "--targets", "16", "64",
                     "--num-trials", "6"]) == 2
    line = _error_line(capsys)
    assert ("--resume of search 's' with settings that change its results: --num-trials 1 -> 6; "
            "--targets 16 32 -> 16 64") in line, line
    assert "--resume-changed" in line
    assert path.read_bytes() == before and not (tmp_path / "results").exists()
    # Resources and folders may change on resume; --resume-changed accepts the rest.
    cfg2 = job_config(**{**_flat(cfg), "max_concurrent": 1, "cpus_per_trial": 0.5,
                         "resume": True})
    assert stored.check_resume(cfg2, "s", False) == []
    cfg3 = job_config(**{**_flat(cfg), "targets": (16.0, 64.0), "resume": True,
                         "resume_changed": True})
    assert stored.check_resume(cfg3, "s", False) == [
        "--targets 16 32 -> 16 64"]


def _flat(cfg) -> dict:
    out = {}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            out.update({k: v for k, v in values.items()
                        if k not in ("sae", "penalty", "kind", "adam_betas",
                                     "normalize_activations", "activation_scale", "l0_target",
                                     "device", "ranges") or section == "search"})
    out.pop("ranges", None)
    out["kind"] = cfg.search.kind
    return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}


def test_resumed_table_keeps_earlier_finished_rows(tmp_path):
    from raysae.results import contract
    from raysae.search.stages import keep_earlier_rows

    cols = {c: [1.0, 1.0] for c in contract.trial_columns(metric_names())}
    earlier = pd.DataFrame({**cols, "experiment": ["s_search"] * 2, "trial_id": ["a-m0", "a-m1"],
                            "status": ["finished", "finished"]})
    contract.write_trials(earlier, tmp_path, metric_names())
    now = earlier.iloc[:1].copy()
    kept = keep_earlier_rows(now, tmp_path)
    assert list(kept["trial_id"]) == ["a-m0", "a-m1"]


# --- errors that cannot heal --------------------------------------------------------------

@pytest.fixture(scope="module")
def small_cache(tiny_model_dir, ray_local, tmp_path_factory):
    src = ActivationSource(model=str(tiny_model_dir), hook=HOOK, context_length=32,
                           n_tokens=2048, shard_rows=512, num_actors=1)
    return build_cache(src, tmp_path_factory.mktemp("acts"), progress=False)


@pytest.mark.slow
def test_corrupt_shard_fails_each_trial_once_and_job_names_cause(small_cache, tiny_model_dir,
                                                                  ray_local, tmp_path, capsys):
    from ray.tune import ExperimentAnalysis
    from test_faults import _nan_copy

    bad = tmp_path / "nan_cache"
    name = _nan_copy(small_cache, bad)
    argv = _base(tiny_model_dir, tmp_path, "--cache", str(bad), "--max-failures", "2",
                 "--name", "bad")
    i = argv.index("--cache-tokens")
    del argv[i:i + 2]
    assert cli.main(["search", *argv]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("raysae search: error: no trial finished ("), line
    # The reader checks checksums (this NaN shard's match); the trainer refuses its rows.
    assert name and "cause: NonFiniteActivationsError: activation batches before step" in line
    assert "rebuild the activation cache or check the model" in line, line
    trials = pd.read_parquet(tmp_path / "results" / "trials.parquet")
    assert set(trials["status"]) == {"error"}
    for experiment in ("bad_refs", "bad_search"):
        analysis = ExperimentAnalysis(str(tmp_path / "tune" / experiment))
        assert analysis.trials
        for trial in analysis.trials:  # ended by their own final report: never retried
            assert trial.status == "TERMINATED" and trial.run_metadata.num_failures == 0
            assert trial.last_result["status"] == "error"
            error = (Path(trial.path) / "error.txt").read_text()  # in --storage
            assert "NonFiniteActivationsError: activation batches" in error


# --- interrupts ---------------------------------------------------------------------------

def _search_args(model, tmp_path):
    return ["--model", str(model), "--hook", HOOK, "--context-length", "32", "--targets", "8",
            "--num-trials", "1", "--seeds", "0", "--baselines", "topk", "--max-concurrent", "1",
            "--total-tokens", "30720", "--cache-tokens", "16384",
            "--storage", str(tmp_path / "tune"), "--results", str(tmp_path / "results"),
            "--no-report"]


def _checkpoints(storage: Path) -> int:
    return len(list(storage.glob("*/*/checkpoint_*")))


def _start(args, tmp_path):
    return subprocess.Popen([sys.executable, str(ROOT / "searches" / "exponent_search.py"),
                             *args], cwd=ROOT, env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_if_running(proc) -> None:
    """SIGKILL a search's whole process group if it still runs (a failing test leaves none)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_for_checkpoint(proc, storage: Path) -> None:
    deadline = time.time() + 300
    while _checkpoints(storage) < 1:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)


def _finished_rows(storage: Path) -> list[str]:
    done = []
    for result in storage.glob("*/*/result.json"):
        lines = result.read_text().splitlines()
        if lines and json.loads(lines[-1]).get("status") == "finished":
            done.append(result.parent.name)
    return done


@pytest.mark.slow
def test_ctrl_c_stops_the_whole_search_and_resume_completes_it(tiny_model_dir, ray_local,
                                                               tmp_path):
    args = _search_args(tiny_model_dir, tmp_path)
    proc = _start(args, tmp_path)
    try:
        _wait_for_checkpoint(proc, tmp_path / "tune")
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        _, err = proc.communicate(timeout=120)
    finally:
        _kill_if_running(proc)
    assert proc.returncode == 130, err[-3000:]
    # The job's own last line (Ray's workers may still print log lines after it).
    last = [ln for ln in err.strip().splitlines() if ln.startswith("raysae")][-1]
    assert last.startswith("raysae search: interrupted (SIGINT); no tables or report written; "
                           "Tune saved the experiments and every trial's last checkpoint: "
                           "resume with raysae search --model "), last
    assert last.endswith(" --no-report --resume"), last
    assert not (tmp_path / "results" / "trials.parquet").exists()
    assert not (tmp_path / "tune" / "exponent_search_search").exists()  # no next stage
    refs = [d for d in (tmp_path / "tune" / "exponent_search_refs").glob("*/") if d.is_dir()]
    assert len(_finished_rows(tmp_path / "tune")) < len(refs)  # stopped mid-stage

    assert cli.main(["search", *args, "--resume"]) == 0
    trials = pd.read_parquet(tmp_path / "results" / "trials.parquet")
    assert trials["trial_id"].is_unique and set(trials["status"]) == {"finished"}
    assert sorted(trials["label"]) == sorted(["L1", "TopK", "sqrt", "sqrt(sqrt)",
                                              *trials.loc[trials["stage"] == "search", "label"]])
    assert len(trials) == len(list((tmp_path / "tune").glob("*/*/result.json"))) == 5


@pytest.mark.slow
def test_sigterm_stops_the_search_and_a_second_one_exits_at_once(tiny_model_dir, tmp_path):
    proc = _start(_search_args(tiny_model_dir, tmp_path), tmp_path)
    try:
        _wait_for_checkpoint(proc, tmp_path / "tune")
        proc.send_signal(signal.SIGTERM)  # a cluster's preemption: to the driver
        time.sleep(0.5)
        start = time.time()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        _kill_if_running(proc)
    assert proc.returncode == 143, err[-3000:]
    assert time.time() - start < 15
    assert "raysae: SIGTERM received: stopping the search" in err
    assert err.strip().splitlines()[-1] == "raysae: SIGTERM again: exiting now"
    assert not (tmp_path / "results" / "trials.parquet").exists()


@pytest.mark.slow
def test_sigkilled_driver_leaves_no_ray_process_behind(tiny_model_dir, tmp_path):
    """Without raysae.cluster.reaper, Ray's dashboard and runtime-env agents outlive a
    SIGKILLed driver by about 60 s (they report the raylet's death to the dead GCS)."""
    import psutil

    proc = _start(_search_args(tiny_model_dir, tmp_path), tmp_path)
    try:
        _wait_for_checkpoint(proc, tmp_path / "tune")
        family = psutil.Process(proc.pid).children(recursive=True)
        names = {p.name() for p in family}
        assert {"raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, names
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, as an OOM killer would
        proc.wait()
        gone, alive = psutil.wait_procs(family, timeout=15)
    finally:
        _kill_if_running(proc)
    assert not alive, [(p.name(), p.cmdline()) for p in alive]


def test_resume_with_nothing_stored_names_what_is_missing(tiny_model_dir, tmp_path):
    """A resume never starts afresh silently: no search of that name in --storage, or Tune
    experiments whose settings file is gone, is an error naming the file."""
    from raysae.search import stored
    from raysae.search.config import job_config

    cfg = job_config(model=str(tiny_model_dir), hook=HOOK, storage=str(tmp_path / "tune"),
                     name="s", resume=True)
    with pytest.raises(ValueError, match=r"--resume: there is no search 's' in --storage "
                                         r".*tune \(no job_settings.json, no Tune experiment\)"):
        stored.check_resume(cfg, "s", False)
    (tmp_path / "tune" / "s_refs").mkdir(parents=True)
    (tmp_path / "tune" / "s_refs" / "tuner.pkl").write_bytes(b"")  # what can_restore looks for
    with pytest.raises(ValueError, match=r"its settings file .*tune/s/job_settings.json is "
                                         r"missing, though its Tune experiments \['s_refs'\]"):
        stored.check_resume(cfg, "s", False)
    stored.store(job_config(**{**_flat(cfg), "resume": False}), "s", False)
    assert stored.check_resume(cfg, "s", False) == []
    (tmp_path / "tune" / "s" / "job_settings.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a settings file"):
        stored.check_resume(cfg, "s", False)
