"""Prometheus for a search: config and Grafana provisioning (fast), and a real local Prometheus
scraping an embedded Ray whose trial-like actor records raysae metrics (slow)."""

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml

from raysae.cluster import head
from raysae.cluster import prometheus as prom
from raysae.cluster.monitoring import METRICS

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "grafana" / "dashboards" / "raysae.json"


def _exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_config_scrapes_rays_discovery_file_on_loopback(tmp_path):
    config = yaml.safe_load(prom.write_config(tmp_path, "/x/" + prom.SD_FILE, "5s").read_text())
    assert config["scrape_configs"][0]["file_sd_configs"][0]["files"] == ["/x/" + prom.SD_FILE]
    cmd = prom.prometheus_command("prometheus", tmp_path / "p.yml", 9090, tmp_path / "d")
    assert "--web.listen-address=127.0.0.1:9090" in cmd  # the default is every interface


def test_dashboard_json_covers_raysae_metrics():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "raysae"
    used = {m for e in _exprs(dash) for m in re.findall(r"ray_(raysae_\w+?)(?:_bucket)?\b", e)}
    assert used <= set(METRICS), used - set(METRICS)
    for name in ("raysae_member_l0", "raysae_trial_l0", "raysae_trial_tokens_per_second",
                 "raysae_tokens_trained_total", "raysae_trials_finished_total",
                 "raysae_harvest_tokens_per_second", "raysae_activations_harvested_total"):
        assert name in used, name
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_grafana_provisioning_extends_rays(tmp_path):
    """Ray's generated folder layout (as MetricsHead writes it) -> ours: Ray's datasource,
    Ray's dashboards with a raysae row in the default one, and raysae's provider."""
    ray_grafana = tmp_path / "session" / "metrics" / "grafana"
    (ray_grafana / "provisioning" / "datasources").mkdir(parents=True)
    (ray_grafana / "provisioning" / "dashboards").mkdir()
    (ray_grafana / "dashboards").mkdir()
    (ray_grafana / "provisioning" / "datasources" / "default.yml").write_text("apiVersion: 1\n")
    (ray_grafana / "provisioning" / "dashboards" / "default.yml").write_text("old")
    base = {"uid": "rayDefaultDashboard", "templating": {"list": [{"name": "datasource"}]},
            "panels": [{"id": 24, "gridPos": {"x": 0, "y": 0, "w": 12, "h": 8}}]}
    (ray_grafana / "dashboards" / "default_grafana_dashboard.json").write_text(json.dumps(base))
    out = head.grafana_provisioning(ray_grafana, tmp_path / "ours")
    provider = yaml.safe_load((out / "dashboards" / "default.yml").read_text())
    ray_dir = Path(provider["providers"][0]["options"]["path"])
    merged = json.loads((ray_dir / "default_grafana_dashboard.json").read_text())
    assert merged["uid"] == "rayDefaultDashboard"  # the Metrics view embeds this uid
    ids = [p["id"] for p in merged["panels"]]
    assert 24 in ids and len(ids) == len(set(ids)) == 2 + len(json.loads(
        DASHBOARD.read_text())["panels"])
    assert min(p["gridPos"]["y"] for p in merged["panels"][1:]) >= 8
    assert [v["name"] for v in merged["templating"]["list"]] == ["datasource", "family"]
    ours = yaml.safe_load((out / "dashboards" / "raysae.yml").read_text())
    assert Path(ours["providers"][0]["options"]["path"]) == DASHBOARD.parent
    env = head.grafana_env(tmp_path, out, 3000)
    assert env["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"


def test_monitor_off_or_without_binary_never_fails(monkeypatch):
    with prom.monitor(False) as running:
        assert running is None
    monkeypatch.setenv("RAYSAE_PROMETHEUS", "/nonexistent/prometheus")
    monkeypatch.delenv("RAY_PROMETHEUS_HOST", raising=False)
    said = []
    with prom.monitor(True, echo=said.append) as running:
        assert running is None
    assert "apt-get install prometheus" in said[0]
    assert "RAY_PROMETHEUS_HOST" not in os.environ


def test_cluster_head_starts_monitoring_on_loopback():
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    start = "\n".join(raw["head_start_ray_commands"])
    assert "RAY_PROMETHEUS_HOST=http://127.0.0.1:9090" in start
    assert "RAY_GRAFANA_HOST=http://127.0.0.1:3000" in start
    assert start.index("RAY_PROMETHEUS_HOST") < start.index("ray start --head")
    assert start.index("ray start --head") < start.index("raysae.cluster.head head")
    setup = "\n".join(raw["head_setup_commands"])
    assert "prometheus" in setup and "systemctl disable --now prometheus" in setup


SCRIPT = textwrap.dedent("""
    import json, os, sys, time, urllib.request
    import ray
    from raysae.cluster import prometheus as prom
    from raysae.cluster.monitoring import TrialMetrics
    from raysae.cluster.ray_env import dashboard_url

    out = {}
    with prom.monitor(True, "local") as running:
        assert running is not None, "Prometheus did not start"
        url = running.url
        out["url"], out["env"] = url, os.environ["RAY_PROMETHEUS_HOST"]

        @ray.remote(num_cpus=0)
        class Trial:  # records like a running Tune trial, every 0.5 s, until stopped
            def run(self, seconds):
                m = TrialMetrics("trial_prom", "power", targets=(8.0, 32.0))
                t0 = time.monotonic()
                while time.monotonic() - t0 < seconds:
                    n = int((time.monotonic() - t0) * 1000) + 1
                    m.record({"l0": 20.0, "mse": 0.5, "tokens_seen": n,
                              "members_l0": json.dumps([8.5, 31.5])})
                    time.sleep(0.5)
                m.finished("completed")

        trial = Trial.remote()
        ref = trial.run.remote(120)
        deadline, got = time.monotonic() + 90, []
        while time.monotonic() < deadline:
            got = prom.query(url, 'ray_raysae_trial_l0{trial_id="trial_prom"}')
            if got:
                break
            time.sleep(1)
        out["trial_l0"] = got
        out["members"] = prom.query(url, 'ray_raysae_member_l0{trial_id="trial_prom"}')
        dash = json.load(open(sys.argv[1]))
        out["panel_errors"] = []
        for p in dash["panels"]:
            for t in p["targets"]:
                try:
                    prom.query(url, t["expr"].replace("$family", ".*"))
                except Exception as err:
                    out["panel_errors"].append([t["expr"], str(err)])
        req = urllib.request.Request(dashboard_url() + "/api/prometheus_health", headers={
            "Authorization": "Bearer " + os.environ["RAY_AUTH_TOKEN"]})
        out["dashboard_health"] = json.loads(urllib.request.urlopen(req, timeout=10).read())
        ray.kill(trial)
    out["env_after"] = os.environ.get("RAY_PROMETHEUS_HOST")
    out["alive_after"] = prom.ready(url)
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow
@pytest.mark.skipif(prom.find_prometheus() is None,
                    reason="no prometheus binary on PATH (Debian/Ubuntu: apt-get install "
                           "prometheus; .ci/run installs it when it can)")
def test_local_prometheus_reads_back_a_running_trials_l0():
    """An embedded Ray (dashboard on, token auth) under ``monitor``: a trial-like actor
    records, Prometheus (via Ray's service-discovery file) has ``ray_raysae_trial_l0`` while
    it runs, the dashboard sees Prometheus, and it is all stopped afterwards."""
    tmp = tempfile.mkdtemp(prefix="rp-", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAYSAE_RAY_ADDRESS", "RAY_PROMETHEUS_HOST")}
    env.update(RAY_TMPDIR=tmp, RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_AUTH_MODE="token",
               RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    try:
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(DASHBOARD)],
                              capture_output=True, text=True, cwd=ROOT, env=env, timeout=400)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["env"] == out["url"] and out["url"].startswith("http://127.0.0.1:")
    assert len(out["trial_l0"]) == 1, out
    series = out["trial_l0"][0]
    assert series["metric"]["family"] == "power" and float(series["value"][1]) == 20.0
    members = {(m["metric"]["member"], m["metric"]["target"]): float(m["value"][1])
               for m in out["members"]}
    assert members == {("0", "8"): 8.5, ("1", "32"): 31.5}
    assert out["panel_errors"] == []
    assert out["dashboard_health"]["result"] is True, out["dashboard_health"]
    assert out["env_after"] is None and out["alive_after"] is False
    port = int(out["url"].rsplit(":", 1)[1])
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # Prometheus is gone
