"""The GPU rehearsal's CPU run and the site packer's pure part (issue #38).

benchmarks/gpu_rehearsal.py runs once on a lent GPU machine; here its ``--cpu`` sequence
(the same CLI search, summary and files at a small shape) is run end to end, and
benchmarks/pack_gpu_site.py's choice of what to ship is checked on a made-up dependency
graph (no metadata, no network).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_packer():
    spec = importlib.util.spec_from_file_location("pack_gpu_site",
                                                  ROOT / "benchmarks" / "pack_gpu_site.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_packer_ships_what_the_image_lacks():
    pack = load_packer()
    image = {"numpy", "Typing_Extensions", "torch"}
    # canonical names: case, '_' and '.' do not matter; the image's and left-out ones go
    assert pack.missing_distributions(["Ray", "numpy", "typing-extensions", "optuna",
                                       "zope.interface"], image, ["wandb", "optuna"]) == {
        "ray", "zope-interface"}
    assert pack.missing_distributions([], image) == set()
    assert "torch" in pack.IMAGE and "ray" not in pack.IMAGE

    graph = {
        "ray": ["click", "pydantic; extra == 'default'", "rich; extra == 'serve'",
                "colorama; sys_platform == 'win32'"],
        "transformer-lens": ["torch>=2", "wandb", "beartype"],
        "wandb": ["sentry-sdk", "pydantic"],
        "pydantic": ["typing-extensions"],
        "torch": ["sympy", "nvidia-cublas"],  # in the image: not descended into
        "beartype": [], "sentry-sdk": [], "click": [], "typing-extensions": [],
    }
    parents = pack.needed_closure(["ray[default]>=2.50", "transformer_lens",
                                   "tomli; python_version < '3.11'"], graph.get,
                                  stop=image)
    assert set(parents) == {"ray", "click", "pydantic", "typing-extensions",
                            "transformer-lens", "torch", "wandb", "beartype", "sentry-sdk"}
    assert parents["pydantic"] == {"ray", "wandb"} and parents["ray"] == {""}
    # wandb left out: sentry-sdk goes with it, pydantic stays (ray needs it)
    assert pack.drop_only_through(parents, ["wandb"]) == {"wandb", "sentry-sdk"}
    assert pack.missing_distributions(parents, image, {"wandb", "sentry-sdk"}) == {
        "ray", "click", "pydantic", "transformer-lens", "beartype"}
    # the tags a CPython 3.12 manylinux x86_64 machine installs
    assert pack.wheel_fits("ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl")
    assert pack.wheel_fits("zstandard-0.25.0-cp312-cp312-manylinux_2_17_x86_64."
                           "manylinux2014_x86_64.whl")
    assert pack.wheel_fits("cryptography-51.0.1-cp311-abi3-manylinux_2_28_x86_64.whl")
    assert pack.wheel_fits("optuna-5.1.0-py3-none-any.whl")
    assert not pack.wheel_fits("ray-2.60.0-cp311-cp311-manylinux2014_x86_64.whl")
    assert not pack.wheel_fits("ray-2.60.0-cp312-cp312-manylinux2014_aarch64.whl")
    assert not pack.wheel_fits("ray-2.60.0-cp312-cp312-macosx_12_0_arm64.whl")


@pytest.mark.slow
def test_cpu_rehearsal(tmp_path):
    """`gpu_rehearsal.py --cpu`: the real search at a small shape, its summary written."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_ADDRESS": "",
           "RAYSAE_RAY_ADDRESS": "", "RAYSAE_CACHE_DIR": str(tmp_path / "raysae-cache"),
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OUT", None)
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_rehearsal.py"),
                           "--cpu", "--out", str(out), "--work", str(tmp_path / "work")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout[-4000:], done.stderr[-4000:])
    assert "=== summary ===" in done.stdout
    assert "sync check: skipped" in done.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "cpu" and summary["search_exit"] == 0
    trials = summary["trials"]
    # the references (L1, sqrt, sqrt(sqrt), TopK) and the one proposal
    assert {t["label"] for t in trials if t["stage"] == "refs"} == {
        "L1", "sqrt", "sqrt(sqrt)", "TopK"}
    assert sum(t["stage"] == "search" for t in trials) == 1
    for t in trials:
        assert t["status"] == "finished"
        assert t["train_tokens_per_second"] > 0 and t["train_seconds"] > 0
        assert t["eval_seconds"] >= 0 and t["setup_seconds"] >= 0
    assert summary["harvest"]["tokens_per_second"] > 0
    assert set(summary["provenance"]["stage_seconds"]) == {"refs", "search"}
    assert "gpu_utilisation" not in summary and summary["sync_check"].startswith("skipped")
    for name in ("rehearsal.log", "search_stdout.log", "trials.parquet", "search.json",
                 "cache_manifest.json"):
        assert (out / name).stat().st_size > 0, name
