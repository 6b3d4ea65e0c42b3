"""Shared fixtures: offline settings, a tiny local model built once, one Ray session."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
_CACHE = tempfile.mkdtemp(prefix="raysae-test-cache-")
os.environ["RAYSAE_CACHE_DIR"] = _CACHE

import pytest  # noqa: E402  (after the environment is set)
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir():
    """Checkpoint folder of LocalModelSpec.tiny(), built once per test session (seconds)."""
    from raysae.lm.local_model import LocalModelSpec, build_local_model

    return build_local_model(LocalModelSpec.tiny(), progress=False)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """The tiny model loaded on CPU (shared: do not modify it)."""
    from raysae.lm.models import load_model

    return load_model(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray session shared by every test that needs Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2,
                 log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
