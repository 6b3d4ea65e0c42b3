"""init_ray: local fallback, address resolution, and a real `ray start` cluster with token auth."""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from raysae.cluster import ray_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_cluster(monkeypatch, tmp_path):
    """No address in the environment and an empty Ray temp dir: nothing recorded."""
    for name in ray_env.ADDRESS_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    return tmp_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _record(tmp: Path, address: str) -> None:
    (tmp / "ray").mkdir(exist_ok=True)
    (tmp / "ray" / "ray_current_cluster").write_text(address)


def test_no_cluster_means_local_quickly(no_cluster):
    start = time.monotonic()
    assert ray_env.resolve_address() is None
    assert ray_env.resolve_address("local") is None
    assert time.monotonic() - start < 5  # generous: it is one file read, no network


def test_unreachable_addresses_fail_fast_with_the_fix(no_cluster, monkeypatch):
    dead = f"127.0.0.1:{_free_port()}"
    with pytest.raises(ConnectionError, match="no Ray cluster answers"):
        ray_env.resolve_address(dead)
    with pytest.raises(ConnectionError, match="ray start --head"):
        ray_env.resolve_address("auto")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("RAYSAE_RAY_ADDRESS", dead)
    with pytest.raises(ConnectionError, match=dead):  # RAYSAE_RAY_ADDRESS wins
        ray_env.resolve_address()
    assert ray_env.resolve_address("local") is None  # "local" beats the environment


def test_recorded_cluster_used_only_when_it_answers(no_cluster):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        live = f"127.0.0.1:{server.getsockname()[1]}"
        _record(no_cluster, live)
        assert ray_env.resolve_address() == live
        assert ray_env.resolve_address("auto") == live
    _record(no_cluster, f"127.0.0.1:{_free_port()}")  # stale record: nobody listens
    assert ray_env.resolve_address() is None


def test_init_ray_is_idempotent_and_reports_local(ray_local):
    info = ray_env.init_ray(num_cpus=1)  # Ray already up: arguments change nothing
    assert info["mode"] == "local"
    assert info["resources"]["CPU"] == 2
    assert info["address"] and ":" in info["address"]
    assert ray_env.init_ray()["address"] == info["address"]


def test_bad_resource_argument():
    with pytest.raises(ValueError, match="num_gpus"):
        ray_env.init_ray(num_gpus=-1)


DRIVER = """
import json, time
from raysae.cluster.ray_env import init_ray, dashboard_url
info = init_ray()
for _ in range(60):
    if dashboard_url():
        break
    time.sleep(0.5)
info["dashboard_url"] = dashboard_url()
print("INFO" + json.dumps(info))
"""


def _driver(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", DRIVER], env=env, cwd=ROOT, timeout=180,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("INFO")][-1]
    return json.loads(line[4:])


def _ray_cli() -> str:
    """The `ray` command of this interpreter's environment, even when it is not on PATH."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def test_finds_ray_start_cluster_with_token_auth():
    """`ray start --head` as in cluster.yaml (token auth, dashboard on 127.0.0.1); drivers join.

    Runs under its own RAY_TMPDIR so neither this cluster nor other Ray users on the machine
    see each other; torn down by killing its process group (never `ray stop`, which stops
    every Ray on the machine).
    """
    tmp = tempfile.mkdtemp(prefix="rs")  # short: Ray's socket paths must stay < 108 chars
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items()
           if k not in ray_env.ADDRESS_ENV_VARS and not k.startswith("RAY_AUTH")}
    env.update(RAY_TMPDIR=tmp, RAY_AUTH_TOKEN=token, RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    head = subprocess.Popen(
        [_ray_cli(), "start", "--head", "--block", "--port=0",
         "--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={_free_port()}",
         "--metrics-export-port=0"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        record = Path(tmp) / "ray" / "ray_current_cluster"
        deadline = time.monotonic() + 120
        while not record.exists():
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(0.3)
        address = record.read_text().strip()
        # 1) Found through ray start's record; token picked up without RAY_AUTH_MODE.
        found = _driver(env)
        assert found["mode"] == "cluster" and found["address"] == address
        assert found["resources"]["CPU"] == 1
        url = found["dashboard_url"]
        assert url and url.startswith("http://127.0.0.1:")
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(url + "/api/version", timeout=10)
        assert denied.value.code == 401  # token auth is on
        req = urllib.request.Request(url + "/api/version",
                                     headers={"Authorization": f"Bearer {token}"})
        assert urllib.request.urlopen(req, timeout=10).status == 200
        # 2) Given explicitly (`--address HOST:PORT`) with the token in ~/.ray/auth_token and
        # no RAY_AUTH_MODE: init_ray turns token mode on (plain ray.init would fail).
        home = Path(tmp) / "home"
        (home / ".ray").mkdir(parents=True)
        (home / ".ray" / "auth_token").write_text(token)
        bare = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
        named = _driver({**bare, "HOME": str(home), "RAYSAE_RAY_ADDRESS": address})
        assert named["mode"] == "cluster" and named["address"] == address
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(tmp, ignore_errors=True)


LOCAL_DRIVER = """
import json, time, urllib.error, urllib.request
import psutil
from raysae.cluster.ray_env import dashboard_url, init_ray
init_ray()
for _ in range(120):
    if dashboard_url():
        break
    time.sleep(0.5)
url = dashboard_url()
port = int(url.rsplit(":", 1)[1])
me = psutil.Process()
hosts = sorted({c.laddr.ip for p in [me, *me.children(recursive=True)]
                for c in p.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port})
codes = []
for headers in ({}, {"Authorization": "Bearer " + __import__("os").environ["RAY_AUTH_TOKEN"]}):
    try:
        codes.append(urllib.request.urlopen(urllib.request.Request(
            url + "/api/version", headers=headers), timeout=10).status)
    except urllib.error.HTTPError as err:
        codes.append(err.code)
print("INFO" + json.dumps({"url": url, "hosts": hosts, "codes": codes}))
"""


def test_embedded_local_ray_dashboard_on_loopback_with_token_auth():
    """The default path (no cluster): the dashboard listens on 127.0.0.1 only and asks for
    Ray's token. (Ray's own gRPC servers listen on all interfaces; see docs/reliability.md,
    Security.)"""
    tmp = tempfile.mkdtemp(prefix="rs")
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items()
           if k not in ray_env.ADDRESS_ENV_VARS and not k.startswith("RAY_AUTH")}
    env.update(RAY_TMPDIR=tmp, RAY_AUTH_TOKEN=token, RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    try:
        out = subprocess.run([sys.executable, "-c", LOCAL_DRIVER], env=env, cwd=ROOT,
                             timeout=240, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        info = json.loads([x for x in out.stdout.splitlines() if x.startswith("INFO")][-1][4:])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert info["url"].startswith("http://127.0.0.1:")
    assert info["hosts"] == ["127.0.0.1"]  # not 0.0.0.0 / ::
    assert info["codes"] == [401, 200]  # token auth on by default
