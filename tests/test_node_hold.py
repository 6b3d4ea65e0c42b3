"""The driver's hold on an autoscaling cluster's size (raysae.search.node_hold), against a
real Ray: what it asks the autoscaler for, stage by stage. That the autoscaler then keeps
the nodes is rehearsed with Ray's fake autoscaler in tests/test_autoscaler.py (slow)."""

import json

from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
from ray.experimental.internal_kv import _internal_kv_get

from raysae.search.config import SearchConfig
from raysae.search.node_hold import NodeHold, held_nodes, holds_nodes, trial_bundle


def _requested() -> list[dict]:
    """The standing request_resources bundles (the v1 autoscaler's channel, which a Ray
    without autoscaler v2 uses)."""
    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []


def test_the_hold_grows_to_the_largest_stage_and_is_released(ray_local):
    search = SearchConfig(cpus_per_trial=1, gpus_per_trial=0.25)
    assert trial_bundle(search) == {"CPU": 1.0, "GPU": 0.25}
    with held_nodes(search, slots=3, keep_nodes=True) as hold:
        assert not hold.active  # a local Ray has no autoscaler: nothing to hold
    hold = NodeHold(search, slots=3, active=True)
    hold.stage(2)  # the references: 2 trials
    assert _requested() == [{"CPU": 1.0, "GPU": 0.25}] * 2
    hold.stage(12)  # the search: more trials than slots, so the slots
    assert _requested() == [{"CPU": 1.0, "GPU": 0.25}] * 3
    hold.stage(1)  # the promotion: fewer trials, the cluster stays as it grew
    assert _requested() == [{"CPU": 1.0, "GPU": 0.25}] * 3 and hold.held == 3
    hold.release()
    assert _requested() == [] and hold.held == 0


def test_no_hold_when_not_asked_for(ray_local, monkeypatch, tmp_path):
    config = tmp_path / "ray_bootstrap_config.yaml"
    config.write_text("available_node_types:\n  gpu: {resources: {CPU: 4, GPU: 1}}\n"
                      "head_node_type: head\nmax_workers: 2\n")
    monkeypatch.setenv("RAYSAE_AUTOSCALER_CONFIG", str(config))
    assert holds_nodes(True) and not holds_nodes(False)
