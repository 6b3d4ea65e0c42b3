"""A trial's GPU share against the GPU memory of the node types the autoscaler may launch
(raysae/search/gpu_memory.py, called by capacity.check_cluster before any work): the
documented cluster passes at the pythia-70m preset's shape, a share too small is refused
with the share that fits, and a GPU of unknown size is only checked when its memory is
given."""

from pathlib import Path

import pytest

from raysae.search.capacity import check_cluster, trial_memory_bytes
from raysae.search.config import job_config
from raysae.search.gpu_memory import ec2_gpu, fitting_share
from raysae.settings import SettingError, UserError

ROOT = Path(__file__).resolve().parents[1]
HEAD = [{"Alive": True, "Resources": {"CPU": 0.0}}]
PRESET = trial_memory_bytes(512, 2048, 6, 4096)  # the pythia-70m preset's trial: 0.94 GiB
WIDE = trial_memory_bytes(512, 512 * 32, 6, 4096)  # --expansion 32: 7.5 GiB


def _config(tmp_path, monkeypatch, instance: str) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("max_workers: 2\nhead_node_type: head\navailable_node_types:\n"
                    "  head: {resources: {CPU: 0}, node_config: {InstanceType: m5.xlarge}}\n"
                    "  gpu: {resources: {CPU: 4, GPU: 1}, max_workers: 2,\n"
                    f"        node_config: {{InstanceType: {instance}}}}}\n")
    monkeypatch.setenv("RAYSAE_AUTOSCALER_CONFIG", str(path))


def test_the_documented_cluster_holds_the_preset(monkeypatch):
    monkeypatch.setenv("RAYSAE_AUTOSCALER_CONFIG", str(ROOT / "cluster.yaml"))
    check_cluster(HEAD, cpus=1, gpus=0.25, memory=PRESET)  # 6 GiB of an A10G per trial


def test_a_share_too_small_for_the_trial_is_refused(monkeypatch):
    monkeypatch.setenv("RAYSAE_AUTOSCALER_CONFIG", str(ROOT / "cluster.yaml"))
    with pytest.raises(UserError) as err:
        check_cluster(HEAD, cpus=1, gpus=0.25, memory=WIDE)
    message = str(err.value)
    assert "6.0 GiB of one A10G (24 GiB; node type ray.worker.gpu, g5.2xlarge)" in message
    assert "needs about 7.5 GiB" in message
    assert "pass --gpus-per-trial 0.333 or more (3 trial(s) per GPU)" in message
    check_cluster(HEAD, cpus=1, gpus=1 / 3, memory=WIDE)  # the share it names fits


def test_a_trial_larger_than_any_gpu_names_a_bigger_node_type(tmp_path, monkeypatch):
    _config(tmp_path, monkeypatch, "g4dn.xlarge")
    check_cluster(HEAD, cpus=1, gpus=0.25, memory=PRESET)  # 4 GiB of a T4
    with pytest.raises(UserError, match="one T4 .*use a GPU node type with more than 20.0"):
        check_cluster(HEAD, cpus=1, gpus=1, memory=20 * 1024**3)


def test_an_unknown_gpu_is_checked_only_with_its_memory_given(tmp_path, monkeypatch):
    _config(tmp_path, monkeypatch, "x9.superbig")
    check_cluster(HEAD, cpus=1, gpus=0.25, memory=WIDE)  # may fit: not refused
    with pytest.raises(UserError, match=r"--gpu-memory-gib\), but one trial needs about 7.5"):
        check_cluster(HEAD, cpus=1, gpus=0.25, memory=WIDE, gpu_memory_gib=16)
    check_cluster(HEAD, cpus=1, gpus=0.25, memory=WIDE, gpu_memory_gib=40)


def test_live_gpus_without_an_autoscaler_use_the_given_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSAE_AUTOSCALER_CONFIG", str(tmp_path / "none.yaml"))
    gpu_node = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}}]
    check_cluster(gpu_node, cpus=1, gpus=0.25, memory=WIDE)  # size unknown: not refused
    with pytest.raises(UserError, match="live GPU node"):
        check_cluster(gpu_node, cpus=1, gpus=0.25, memory=WIDE, gpu_memory_gib=24)
    check_cluster(gpu_node, cpus=1, gpus=0, memory=WIDE, gpu_memory_gib=1)  # CPU trials


def test_the_table_and_the_setting():
    assert ec2_gpu("g5.2xlarge") == ("A10G", 24.0)
    assert ec2_gpu("p4de.24xlarge") == ("A100-80GB", 80.0)
    assert ec2_gpu("p3dn.24xlarge") == ("V100-32GB", 32.0)
    assert ec2_gpu("m5.xlarge") is None and ec2_gpu(None) is None
    assert fitting_share(7.5, 24) == pytest.approx(1 / 3) and fitting_share(30, 24) is None
    assert job_config("local", gpu_memory_gib=24).search.gpu_memory_gib == 24
    with pytest.raises(SettingError, match="gpu_memory_gib 0 is invalid"):
        job_config("local", gpu_memory_gib=0)
