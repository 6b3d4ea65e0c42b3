"""Custom metrics: no-ops outside Ray, and really exported through Ray's metrics agent."""

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from raysae.cluster import monitoring
from raysae.cluster.monitoring import METRICS, HarvestMetrics, TrialMetrics

ROOT = Path(__file__).resolve().parents[1]


def test_noop_outside_ray():
    """A fresh process without ray.init: recording works and creates no metric objects."""
    code = (
        "import sys; from raysae.cluster import monitoring as m\n"
        "t = m.TrialMetrics('t0', 'power'); t.record({'l0': 3.0, 'mse': 0.1, 'tokens_seen': 64})\n"
        "t.finished('completed'); m.HarvestMetrics('lm', 'hook').record(8, 0.5)\n"
        "assert not m.ray_connected() and m._created == {} and m._failed == set(), m._created\n"
        "assert 'ray' not in sys.modules or not __import__('ray').is_initialized()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="trial_id"):
        TrialMetrics("", "power")
    with pytest.raises(ValueError, match="n_tokens"):
        HarvestMetrics("lm", "hook").record(-1, 0.1)


def test_every_metric_is_documented():
    text = (ROOT / "docs" / "cluster.md").read_text()
    missing = [name for name in METRICS if name not in text]
    assert not missing, f"docs/cluster.md does not mention {missing}"


def _scrape(port: int) -> dict:
    """{(prometheus sample name, frozenset of our tags): value} for every raysae sample."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_raysae_"):
                ours = {k: v for k, v in s.labels.items()
                        if k in ("trial_id", "family", "status", "model", "hook", "le",
                                 "member", "target")}
                found[(s.name, frozenset(ours.items()))] = s.value
    return found


def test_metrics_reach_prometheus_endpoint(ray_local):
    """Record from an actor (as a Tune trial would), then read the agent's /metrics back."""
    ray = ray_local
    port = ray._private.worker._global_node.metrics_export_port
    assert port, "Ray started without a metrics export port"

    @ray.remote(num_cpus=0)
    class Recorder:
        def run(self):
            trial = TrialMetrics("trial_a", "power", start_tokens=0, targets=(8, 32))
            trial.record({"l0": 40.0, "mse": 0.5, "tokens_seen": 1000})
            trial.record({"l0": 12.5, "mse": 0.25, "tokens_seen": 3000,
                          "members_l0": "[9.5, 30.25]"})
            trial.finished("completed")
            HarvestMetrics("tiny", "blocks.1.hook_resid_post").record(4096, 0.5)
            return sorted(monitoring._created), sorted(monitoring._failed)

    actor = Recorder.remote()
    created, failed = ray.get(actor.run.remote())
    assert created == sorted(METRICS) and failed == []
    trial = frozenset({("trial_id", "trial_a"), ("family", "power")})
    harvest = frozenset({("model", "tiny"), ("hook", "blocks.1.hook_resid_post")})
    want = {
        ("ray_raysae_trial_l0", trial): 12.5,
        ("ray_raysae_trial_mse", trial): 0.25,
        ("ray_raysae_member_l0", trial | {("member", "0"), ("target", "8")}): 9.5,
        ("ray_raysae_member_l0", trial | {("member", "1"), ("target", "32")}): 30.25,
        ("ray_raysae_tokens_trained_total", trial): 3000.0,
        ("ray_raysae_trials_finished_total",
         frozenset({("family", "power"), ("status", "completed")})): 1.0,
        ("ray_raysae_activations_harvested_total", harvest): 4096.0,
        ("ray_raysae_harvest_tokens_per_second", harvest): 8192.0,
        ("ray_raysae_harvest_batch_seconds_count", harvest): 1.0,
    }
    deadline, got = time.monotonic() + 45, {}
    try:
        while time.monotonic() < deadline:  # the agent exports periodically (default 10 s)
            got = _scrape(port)
            if all(key in got for key in want):
                break
            time.sleep(1)
    finally:
        ray.kill(actor)
    for key, value in want.items():
        assert got.get(key) == pytest.approx(value), (key, sorted(got))
    rate = [v for (name, tags), v in got.items()  # this trial's (earlier tests' trials export
            if name == "ray_raysae_trial_tokens_per_second" and trial <= tags]  # to this Ray)
    assert len(rate) == 1 and rate[0] > 0
