"""cluster.yaml: valid for Ray's own autoscaler schema, and it says what docs/cluster.md says."""

import copy
import os
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _validated(config: dict) -> dict:
    """What `ray up` does before touching the cloud: fill defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_validation(raw):
    prepared = _validated(raw)
    head = prepared["head_node_type"]
    workers = {k: v for k, v in prepared["available_node_types"].items() if k != head}
    assert prepared["provider"]["type"] == "aws"
    assert prepared["available_node_types"][head]["resources"] == {"CPU": 0}
    assert list(workers) == ["ray.worker.gpu"]
    gpu = workers["ray.worker.gpu"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert re.match(r"^(g|p)\d", gpu["node_config"]["InstanceType"])
    # prepare_config merged the common setup into each node kind's list.
    assert prepared["head_setup_commands"][: len(raw["setup_commands"])] == raw["setup_commands"]


@pytest.mark.parametrize("edit, error", [
    (lambda c: c["available_node_types"]["ray.worker.gpu"].update(min_worker=0),
     jsonschema.ValidationError),  # a misspelt key
    (lambda c: c.update(setup_command=["pip install -e ."]), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["ray.head.cpu"].update(resources={"CPU": 0.5}),
     jsonschema.ValidationError),  # resources are whole numbers
    (lambda c: c["available_node_types"]["ray.worker.gpu"].pop("node_config"),
     jsonschema.ValidationError),
    (lambda c: c.update(head_node_type="ray.head.missing"), ValueError),
    (lambda c: c["available_node_types"]["ray.worker.gpu"].update(min_workers=9), ValueError),
])
def test_broken_edits_are_rejected(raw, edit, error):
    broken = copy.deepcopy(raw)
    edit(broken)
    with pytest.raises(error):
        _validated(broken)


def _commands(config: dict, key: str) -> str:
    return "\n".join(config[key])


def test_storage_auth_and_dashboard_settings(raw):
    text = CLUSTER_YAML.read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert len(re.findall(r"RAYSAE_STORAGE=", code)) == 1, "set RAYSAE_STORAGE in one place"
    assert re.search(r"RAYSAE_STORAGE=s3://", code)
    assert "export RAY_AUTH_MODE=token" in code
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert raw["file_mounts"]["/home/ubuntu/raysae"] == "."
    head_start = _commands(raw, "head_start_ray_commands")
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in code
    assert "--metrics-export-port=8080" in _commands(raw, "worker_start_ray_commands")


def test_setup_installs_pinned_torch_then_project(raw):
    worker = _commands(raw, "worker_setup_commands")
    head = _commands(raw, "head_setup_commands")
    cu = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
    assert cu in worker and worker.index(cu) < worker.index("-e /home/ubuntu/raysae")
    assert "whl/cpu" in head and head.index("whl/cpu") < head.index("-e /home/ubuntu/raysae")
    # Every install on every node goes through constraints.txt: one set of versions.
    constrained = "-c /home/ubuntu/raysae/constraints.txt"
    for section in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        installs = [c for c in raw[section] if "pip install" in c and "torch==" not in c]
        assert installs and all(constrained in c for c in installs), section


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return {re.split("==", ln)[0].lower().replace("_", "-"): ln.split("==")[1]
            for ln in lines if ln.strip() and not ln.startswith("#")}


def test_constraints_pin_every_dependency_at_the_installed_version():
    """Autoscaled workers install exactly what the head (and these tests) run."""
    import tomllib
    from importlib import metadata

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[\[<>=!~ ]", d)[0].lower().replace("_", "-") for d in deps}
    pins = _pins()
    assert names - {"torch"} <= set(pins), sorted(names - {"torch"} - set(pins))
    # Ray pinned exactly (the nodes must run the launcher's version; token auth needs >= 2.60).
    assert tuple(map(int, pins["ray"].split("."))) >= (2, 60, 0)
    for name, version in pins.items():
        assert metadata.version(name) == version, name


def test_gpu_workers_state_their_resources(raw):
    """The driver sizes trials from the node types before any GPU node exists."""
    gpu = raw["available_node_types"]["ray.worker.gpu"]
    assert gpu["min_workers"] == 0 and gpu["resources"]["GPU"] >= 1 and gpu["resources"]["CPU"]


@pytest.mark.parametrize("bashrc", [None, "", "# existing\ncase $- in *i*) ;; *) return;; esac\n"])
def test_env_setup_command_runs_and_is_idempotent(raw, tmp_path, bashrc):
    """Run the real first setup command in a scratch HOME (twice) and read the env back."""
    home = tmp_path / "home"
    home.mkdir()
    if bashrc is not None:
        (home / ".bashrc").write_text(bashrc)
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    for _ in range(2):
        subprocess.run(["bash", "-c", raw["setup_commands"][0]], env=env, check=True)
    lines = (home / ".bashrc").read_text().splitlines()
    assert lines[0] == ". ~/.raysae/env.sh" and lines.count(". ~/.raysae/env.sh") == 1
    if bashrc:
        assert lines[1:] == bashrc.splitlines()
    probe = "echo $RAYSAE_STORAGE $RAY_AUTH_MODE $RAYSAE_CACHE_DIR"
    out = subprocess.run(["bash", "-c", f". ~/.raysae/env.sh; {probe}"], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out[0].startswith("s3://") and out[1] == "token"
    assert out[2] == str(home / ".cache" / "raysae")
    # The non-interactive guard of a stock .bashrc must not hide it (sourced before the guard).
    out = subprocess.run(["bash", "-c", f"source ~/.bashrc; {probe}"], env=env, check=True,
                         capture_output=True, text=True).stdout
    assert shlex.split(out)[1] == "token"
