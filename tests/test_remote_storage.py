"""Tune's storage on S3 (a local moto server): every artifact a local run collects (each
SAE in SAELens layout, feature statistics, removal curves, the tables) comes back into the
local results folder. The search runs in its own process with its own Ray, so the S3
settings reach every trial worker from the environment, as on a cluster."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("moto")
ROOT = Path(__file__).resolve().parents[1]

SEARCH = """
import sys
sys.path.insert(0, {tests!r})
import ray
from search_helpers import make_plan, make_spec
from raysae.activations.cache import build_cache
from raysae.activations.source import ActivationSource
from raysae.search.stages import run_search
ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2)
hook = "blocks.0.hook_resid_post"
src = ActivationSource(model={model!r}, hook=hook, context_length=32, n_tokens=8192,
                       num_actors=1)
cache = build_cache(src, {work!r} + "/acts", progress=False)
spec = make_spec(activations=str(cache), model={model!r}, hook=hook, d_in=32, d_sae=128,
                 context_length=32, total_tokens=512 * 20, batch_size=512, log_every=10,
                 eval_blocks=8, feature_tokens=2000, lambda_mode="fixed",
                 threshold_sweep=True, sweep_points=3)
plan = make_plan("s3run", "s3://raysae-test/searches", spec,
                 grid=({{"p": 1.0, "eps": 0.0, "lam": 1.0}},))
print("OUT", run_search(plan, {work!r} + "/results"))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_artifacts_come_back_from_s3(tiny_model_dir, tmp_path):
    port, ray_tmp = _free_port(), tempfile.mkdtemp(prefix="rs")  # short socket paths
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": "", "RAYSAE_RAY_ADDRESS": ""}
    server = subprocess.Popen([Path(sys.executable).with_name("moto_server"), "-H",
                               "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import boto3

        deadline = time.monotonic() + 30
        while True:
            try:
                boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                             aws_access_key_id="testing", aws_secret_access_key="testing"
                             ).create_bucket(Bucket="raysae-test")
                break
            except Exception:
                assert time.monotonic() < deadline, "moto_server did not come up"
                time.sleep(0.3)
        code = SEARCH.format(tests=str(ROOT / "tests"), model=str(tiny_model_dir),
                             work=str(tmp_path))
        run = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, text=True,
                             capture_output=True, timeout=400)
        assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    out = tmp_path / "results"
    trials = pd.read_parquet(out / "trials.parquet")
    assert set(trials["status"]) == {"finished"}
    # Tune's experiments are in S3 only; the checkpoints' artifacts were fetched here.
    assert not (tmp_path / "searches").exists()
    for path in trials["checkpoint_path"]:
        assert Path(path).is_relative_to(out / "checkpoints"), path
        assert (Path(path) / "sae" / "0" / "sae_weights.safetensors").is_file()
        assert (Path(path) / "sae" / "0" / "cfg.json").is_file()
        assert not (Path(path) / "trainer.pt").exists()  # the trainer state stays in S3
    assert len(pd.read_parquet(out / "feature_stats.parquet"))
    assert set(pd.read_parquet(out / "ablations.parquet")["trial_id"]) == set(trials["trial_id"])
