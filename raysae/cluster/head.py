"""Monitoring on a cluster's head node: Prometheus on Ray's service discovery and, where it is
installed, Grafana with Ray's provisioned config plus raysae's dashboard, both on 127.0.0.1
(started by cluster.yaml through ``python -m raysae.cluster.head head``)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from raysae.cluster.prometheus import (
    DASHBOARDS_DIR,
    PROVIDER_FILE,
    SD_FILE,
    STATE_DIR,
    find_grafana,
    find_prometheus,
    prometheus_command,
    write_config,
)


def grafana_provisioning(ray_grafana: Path, out: Path,
                         dashboards: Path = DASHBOARDS_DIR) -> Path:
    """A Grafana provisioning folder ``out/provisioning``: Ray's (its Prometheus datasource
    and its dashboards, from the session's ``metrics/grafana``), with raysae's panels appended
    to Ray's default dashboard (the one the Ray dashboard's Metrics view embeds), plus a
    provider for raysae's own dashboards (``grafana/dashboards``)."""
    src = ray_grafana / "provisioning"
    if not (src / "datasources").is_dir() or not (ray_grafana / "dashboards").is_dir():
        raise FileNotFoundError(f"Ray's Grafana provisioning is missing under {ray_grafana}")
    if out.exists():
        shutil.rmtree(out)
    prov, ray_dashboards = out / "provisioning", out / "ray-dashboards"
    shutil.copytree(src, prov)
    shutil.copytree(ray_grafana / "dashboards", ray_dashboards)
    (prov / "dashboards" / "default.yml").write_text(
        DEFAULT_PROVIDER.format(path=ray_dashboards))
    default = ray_dashboards / "default_grafana_dashboard.json"
    if default.exists():
        ours = json.loads((dashboards / "raysae.json").read_text())
        default.write_text(json.dumps(merge_into(json.loads(default.read_text()), ours)))
    text = PROVIDER_FILE.read_text().replace("RAYSAE_DASHBOARDS_DIR", str(dashboards))
    (prov / "dashboards" / "raysae.yml").write_text(text)
    return prov


DEFAULT_PROVIDER = """apiVersion: 1
providers:
  - name: Ray
    folder: Ray
    type: file
    options:
      path: {path}
"""


def merge_into(base: dict, ours: dict) -> dict:
    """``base`` (a Grafana dashboard) with a "raysae" row and ``ours``'s panels below its
    own, ids shifted past base's, and ``ours``'s variables it lacks (e.g. ``family``)."""
    panels = list(base.get("panels", []))
    bottom = max((p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels if "gridPos" in p),
                 default=0)
    next_id = max((p.get("id", 0) for p in panels), default=0) + 1000
    panels.append({"id": next_id, "type": "row", "title": "raysae", "collapsed": False,
                   "gridPos": {"x": 0, "y": bottom, "w": 24, "h": 1}, "panels": []})
    for p in ours["panels"]:
        p = json.loads(json.dumps(p))
        p["id"] = next_id + p["id"]
        p["gridPos"]["y"] += bottom + 1
        panels.append(p)
    merged = {**base, "panels": panels}
    names = {v.get("name") for v in base.get("templating", {}).get("list", [])}
    extra = [v for v in ours.get("templating", {}).get("list", []) if v["name"] not in names]
    merged["templating"] = {"list": [*base.get("templating", {}).get("list", []), *extra]}
    return merged


def grafana_env(state: Path, provisioning: Path, port: int) -> dict[str, str]:
    """Overrides of Ray's grafana.ini: loopback only, writable paths, our provisioning."""
    return {"GF_SERVER_HTTP_ADDR": "127.0.0.1", "GF_SERVER_HTTP_PORT": str(port),
            "GF_PATHS_DATA": str(state / "grafana-data"),
            "GF_PATHS_LOGS": str(state / "grafana-logs"),
            "GF_PATHS_PROVISIONING": str(provisioning),
            "GF_ANALYTICS_REPORTING_ENABLED": "false",
            "GF_ANALYTICS_CHECK_FOR_UPDATES": "false"}


def _kill_pidfile(pidfile: Path) -> None:
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)
    except (OSError, ValueError):
        pass
    pidfile.unlink(missing_ok=True)


def _detach(cmd: list[str], log: Path, pidfile: Path, env: dict | None = None) -> int:
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, **(env or {})})
    pidfile.write_text(str(proc.pid))
    return proc.pid


def _wait_for(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def start_head(temp_dir: Path = Path("/tmp/ray"), state: Path = STATE_DIR,
               prometheus_port: int = 9090, grafana_port: int = 3000,
               timeout: float = 60.0) -> dict[str, str]:
    """Start (or restart) Prometheus and, if installed, Grafana for the Ray session that
    ``ray start --head`` just began; both detached, on 127.0.0.1. Returns what runs where."""
    state = state.expanduser()
    state.mkdir(parents=True, exist_ok=True)
    stop_head(state)
    session = (temp_dir / "session_latest").resolve()
    if not session.is_dir():
        print(f"raysae: no Ray session under {temp_dir} (ray start --head first, or pass "
              "its --temp-dir); Prometheus will find no targets until one starts",
              file=sys.stderr)
    started: dict[str, str] = {}
    binary = find_prometheus()
    if binary is None:
        print("raysae: no prometheus binary; the dashboard's charts stay off", file=sys.stderr)
    else:
        config = write_config(state, session / SD_FILE, "10s")
        _detach(prometheus_command(binary, config, prometheus_port, state / "prometheus-data"),
                state / "prometheus.log", state / "prometheus.pid")
        started["prometheus"] = f"http://127.0.0.1:{prometheus_port}"
    grafana = find_grafana()
    ray_grafana = session / "metrics" / "grafana"
    if grafana is None:
        print("raysae: Grafana not installed; Prometheus only", file=sys.stderr)
    elif not _wait_for(ray_grafana / "grafana.ini", timeout):
        print(f"raysae: {ray_grafana}/grafana.ini did not appear (dashboard off?); no Grafana",
              file=sys.stderr)
    else:
        time.sleep(2)  # Ray writes grafana.ini first, then the provisioning files
        prov = grafana_provisioning(ray_grafana, state / "grafana")
        home = "/usr/share/grafana"
        _detach([*grafana, f"--config={ray_grafana / 'grafana.ini'}", f"--homepath={home}"],
                state / "grafana.log", state / "grafana.pid",
                grafana_env(state, prov, grafana_port))
        started["grafana"] = f"http://127.0.0.1:{grafana_port}"
    return started


def stop_head(state: Path = STATE_DIR) -> None:
    """Stop what ``start_head`` started (by its pid files)."""
    state = state.expanduser()
    for name in ("grafana", "prometheus"):
        _kill_pidfile(state / f"{name}.pid")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raysae.cluster.head",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    head = sub.add_parser("head", help="start Prometheus (+ Grafana) for the head's Ray")
    head.add_argument("--prometheus-port", type=int, default=9090)
    head.add_argument("--grafana-port", type=int, default=3000)
    head.add_argument("--temp-dir", type=Path, default=Path("/tmp/ray"))
    sub.add_parser("stop", help="stop them")
    args = parser.parse_args(argv)
    if args.cmd == "stop":
        stop_head()
        return 0
    started = start_head(args.temp_dir, prometheus_port=args.prometheus_port,
                         grafana_port=args.grafana_port)
    for name, url in started.items():
        print(f"raysae: {name} on {url} (127.0.0.1 only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
