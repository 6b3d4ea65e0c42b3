"""Prometheus (and, where installed, Grafana) for a running search, bound to 127.0.0.1.

Ray's dashboard writes the list of every node's metrics endpoint to
``<session dir>/prom_metrics_service_discovery.json`` every 5 s (Prometheus file service
discovery); a Prometheus pointed at that file scrapes Ray's and raysae's metrics from every
node, including autoscaled workers. This module starts such a Prometheus:

* locally, around one job (``monitor(True, address)``; ``--monitor`` on the command line):
  a free port on 127.0.0.1, a throwaway data folder, stopped when the job ends (also on an
  error). ``RAY_PROMETHEUS_HOST`` is set before Ray starts so the embedded Ray's dashboard
  finds it. A Prometheus that cannot start is a warning, never a failed job.
* on a ``ray up`` head (``python -m raysae.cluster.head head``, run by cluster.yaml
  after ``ray start --head``): Prometheus on 127.0.0.1:9090 and, when a ``grafana`` binary
  is installed, Grafana on 127.0.0.1:3000 with the config Ray generated for this session
  (``metrics/grafana``: its datasource and dashboards) plus raysae's dashboard
  (``grafana/dashboards/raysae.json``), detached, with pid files so a re-run replaces them.

The dashboard reads ``RAY_PROMETHEUS_HOST`` / ``RAY_GRAFANA_HOST`` when it starts, so
cluster.yaml exports them before ``ray start --head``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import ray

from raysae.cluster.ray_env import init_ray

logger = logging.getLogger(__name__)

SD_FILE = "prom_metrics_service_discovery.json"
"""Ray's Prometheus service-discovery file, in the session dir (ray_constants)."""
REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS_DIR = REPO_ROOT / "grafana" / "dashboards"
"""raysae's Grafana dashboards (JSON), provisioned next to Ray's."""
PROVIDER_FILE = REPO_ROOT / "grafana" / "provisioning" / "dashboards" / "raysae.yml"
STATE_DIR = Path("~/.raysae/monitoring")
"""Where the head's Prometheus/Grafana keep data, logs and pid files."""

CONFIG_TEMPLATE = """\
# Written by raysae.cluster.prometheus: scrape every Ray node listed in Ray's service
# discovery file (rewritten by the dashboard every 5 s, autoscaled nodes included).
global:
  scrape_interval: {interval}
  evaluation_interval: {interval}
scrape_configs:
  - job_name: ray
    file_sd_configs:
      - files: ['{sd_file}']
        refresh_interval: 30s
"""


def find_prometheus() -> str | None:
    """The Prometheus binary: $RAYSAE_PROMETHEUS, else ``prometheus`` on PATH, else None."""
    explicit = os.environ.get("RAYSAE_PROMETHEUS")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return shutil.which("prometheus")


def find_grafana() -> list[str] | None:
    """The command that starts Grafana's server (``grafana server`` or the older
    ``grafana-server``), or None when Grafana is not installed."""
    path = os.environ.get("PATH", os.defpath) + os.pathsep + "/usr/sbin:/usr/share/grafana/bin"
    found = shutil.which("grafana", path=path)
    if found:
        return [found, "server"]
    found = shutil.which("grafana-server", path=path)
    return [found] if found else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(folder: Path, sd_file: Path | str, interval: str = "10s") -> Path:
    """``folder/prometheus.yml`` scraping the targets listed in ``sd_file``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "prometheus.yml"
    path.write_text(CONFIG_TEMPLATE.format(interval=interval, sd_file=sd_file))
    return path


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (local http)
        return resp.read()


def query(url: str, promql: str, timeout: float = 5.0) -> list[dict]:
    """The ``data.result`` of an instant query to Prometheus at ``url`` (``/api/v1/query``)."""
    body = json.loads(_get(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}",
                           timeout))
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus query {promql!r} failed: {body}")
    return body["data"]["result"]


def ready(url: str) -> bool:
    """True when a Prometheus at ``url`` answers queries (the probe Ray's dashboard uses)."""
    try:
        return json.loads(_get(f"{url}/api/v1/query?query=vector(1)", 2.0)).get(
            "status") == "success"
    except (OSError, ValueError):
        return False


def prometheus_command(binary: str, config: Path, port: int, data: Path,
                       retention: str = "15d") -> list[str]:
    """Prometheus listening on 127.0.0.1 only, keeping its data in ``data``."""
    return [binary, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
            f"--storage.tsdb.path={data}", f"--storage.tsdb.retention.time={retention}"]


class LocalPrometheus:
    """One Prometheus process for this job: ``start`` then ``stop`` (idempotent)."""

    def __init__(self, port: int | None = None, binary: str | None = None):
        self.port = port or free_port()
        self.binary = binary or find_prometheus()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.folder: Path | None = None

    def start(self, sd_file: Path | str, *, interval: str = "5s", timeout: float = 30.0):
        """Start scraping the targets in ``sd_file``; returns self once it answers queries."""
        if not self.binary:
            raise FileNotFoundError("no prometheus binary on PATH (apt-get install prometheus)")
        self.folder = Path(tempfile.mkdtemp(prefix="raysae-prometheus-"))
        config = write_config(self.folder, sd_file, interval)
        log = open(self.folder / "prometheus.log", "wb")  # noqa: SIM115 (kept by the process)
        self.proc = subprocess.Popen(
            prometheus_command(self.binary, config, self.port, self.folder / "data", "1d"),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while not ready(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.folder / "prometheus.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"Prometheus did not start on {self.url}:\n{tail}")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def session_dir() -> Path | None:
    """The session folder of the Ray this process is connected to (None without Ray)."""
    node = getattr(ray._private.worker, "_global_node", None) if ray.is_initialized() else None
    if node is None:
        return None
    try:
        return Path(node.get_session_dir_path())
    except Exception:  # a driver of a remote cluster may not know it
        return None


def discovery_file(folder: Path | None = None) -> Path:
    """Ray's service-discovery file of this session; when the dashboard is off (nobody writes
    it) or the session is not local, a static one listing the nodes' metrics ports now."""
    folder = folder or session_dir()
    if folder is not None:
        path = folder / SD_FILE
        node = ray._private.worker._global_node
        if path.exists() or getattr(node, "webui_url", None):
            return path
    targets = [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}"
               for n in ray.nodes()
               if n.get("Alive", n.get("alive")) and n.get("MetricsExportPort")]
    path = Path(tempfile.mkdtemp(prefix="raysae-sd-")) / SD_FILE
    path.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": targets}]))
    return path


@contextlib.contextmanager
def monitor(enabled: bool, address: str | None = None, *,
            echo=None) -> Iterator[LocalPrometheus | None]:
    """Around a job: with ``enabled``, start Ray (``init_ray(address)``) with
    ``RAY_PROMETHEUS_HOST`` pointing at a free local port, then Prometheus on that port; stop
    it when the block ends. Yields the running LocalPrometheus, or None (disabled, or it
    could not start: a warning, the job goes on)."""
    if not enabled:
        yield None
        return

    echo = echo or (lambda msg: print(msg, flush=True))
    prom = LocalPrometheus()
    before = os.environ.get("RAY_PROMETHEUS_HOST")
    existing = before if before and ready(before) else None
    if existing:
        echo(f"raysae: monitor: using the Prometheus at {existing} (RAY_PROMETHEUS_HOST)")
        yield None
        return
    if prom.binary is None:
        echo("raysae: monitor: no `prometheus` on PATH (Debian/Ubuntu: apt-get install "
             "prometheus); running without it")
        yield None
        return
    os.environ["RAY_PROMETHEUS_HOST"] = prom.url  # read by a local dashboard at start
    running = None
    try:
        info = init_ray(address)
        try:
            running = prom.start(discovery_file())
            echo(f"raysae: Prometheus: {prom.url} (e.g. {prom.url}/graph?g0.expr="
                 f"ray_raysae_trial_l0); stopped when the job ends")
            if info.get("mode") == "cluster":
                echo("raysae: monitor: joined a running cluster, whose dashboard keeps the "
                     "RAY_PROMETHEUS_HOST it started with")
        except Exception as err:  # monitoring never fails the job
            echo(f"raysae: monitor: Prometheus did not start ({err}); running without it")
        yield running
    finally:
        prom.stop()
        if before is None:
            os.environ.pop("RAY_PROMETHEUS_HOST", None)
        else:
            os.environ["RAY_PROMETHEUS_HOST"] = before


# ------------------------------------------------------------------ the cluster's head
