"""Worker nodes kept through a whole search, with their activation caches.

Stages run one after another. Under successive halving the promotion trains two proposals
for the full budget (hours on a GPU) while the other workers sit idle past the autoscaler's
``idle_timeout_minutes``: they would be terminated with their caches, and the confirmation
would launch new nodes that reinstall CUDA torch and rebuild the cache. So the driver asks
the autoscaler (``ray.autoscaler.sdk.request_resources``) for the trial bundles of the
largest stage so far, at most the trials that can run at once; the autoscaler neither
removes a node that request needs nor lets the cluster shrink below it. The request is
replaced by an empty one when the search ends, fails or is interrupted, and idle nodes go
as before. It is a no-op without an autoscaler (a local Ray, a fixed cluster).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import ray
from ray.autoscaler.sdk import request_resources

from raysae.search import capacity


def trial_bundle(search) -> dict[str, float]:
    """The resources one trial holds (``SearchConfig.cpus_per_trial``, resolved GPU share)."""
    bundle = {"CPU": float(search.cpus_per_trial)}
    if search.gpus_per_trial:
        bundle["GPU"] = float(search.gpus_per_trial)
    return bundle


class NodeHold:
    """The largest stage's bundles, held: ``stage(n)`` before a stage of ``n`` trials."""

    def __init__(self, search, slots: int, active: bool):
        self.bundle, self.slots, self.active = trial_bundle(search), max(int(slots), 1), active
        self.held = 0
        """Bundles requested now (0: no request stands)."""

    def stage(self, trials: int) -> None:
        """Hold ``min(trials, slots)`` bundles if that is more than held already: a stage
        with fewer trials (a promotion) keeps what the earlier stages grew to."""
        wanted = min(int(trials), self.slots)
        if self.active and wanted > self.held:
            request_resources(bundles=[dict(self.bundle) for _ in range(wanted)])
            self.held = wanted
            print(f"raysae: holding the cluster at {wanted} trial(s) of {self.bundle} until "
                  "the search ends (--no-keep-nodes releases nodes between stages)",
                  flush=True)

    def release(self) -> None:
        """Replace the request by an empty one; idle nodes then go after their timeout."""
        if self.active and self.held and ray.is_initialized():
            request_resources(bundles=[])
            self.held = 0
            print(f"raysae: released the cluster at {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                  "idle workers now end after the autoscaler's idle timeout", flush=True)


def holds_nodes(keep_nodes: bool) -> bool:
    """Whether to hold: asked for, on a Ray cluster with an autoscaler config (its node
    types; capacity.autoscaler_node_types), so never on a local or fixed-size Ray."""
    return bool(keep_nodes) and ray.is_initialized() and bool(capacity.autoscaler_node_types())


@contextlib.contextmanager
def held_nodes(search, slots: int, keep_nodes: bool) -> Iterator[NodeHold]:
    """A NodeHold for one search, released however the search ends."""
    hold = NodeHold(search, slots, holds_nodes(keep_nodes))
    try:
        yield hold
    finally:
        hold.release()
