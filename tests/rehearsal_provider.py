"""Ray's fake multi-node provider with a way in from outside, for the autoscaler rehearsal
(tests/autoscaler_rehearsal.py, scenario worker-kill).

The autoscaler's provider lives in its monitor process, so nothing outside can call its
terminate_node. This subclass looks, whenever the autoscaler lists the nodes, for request
files ``<provider.terminate_dir>/<node id>`` and terminates those nodes through the
provider, as a cloud console or a spot interruption terminates an instance: the node's
processes are stopped and the provider no longer lists it, so the autoscaler launches a
replacement for the work still waiting. The fake provider stops the node's raylet, whose
dashboard and runtime-env agents then outlive it for up to a minute (they report to the
GCS with a fixed timeout); a terminated instance keeps no process, so every process marked
with the node's id is killed too. Each request is renamed ``<node id>.done`` once
carried out. The monitor imports it as an external provider
(``provider: {type: external, module: rehearsal_provider.TerminableFakeProvider}``),
with this folder on its PYTHONPATH.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path

from isolated import pids_using
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

NODE_ENV = "RAY_OVERRIDE_NODE_ID_FOR_TESTING"
"""The fake provider starts each worker's raylet with its node id in this variable; the
raylet's workers and agents inherit it, which marks every process of that node."""

logger = logging.getLogger(__name__)


class TerminableFakeProvider(FakeMultiNodeProvider):
    def non_terminated_nodes(self, tag_filters):
        self._terminate_requested()
        return super().non_terminated_nodes(tag_filters)

    def _terminate_requested(self) -> None:
        folder = self.provider_config.get("terminate_dir")
        if not folder or not os.path.isdir(folder):
            return
        for request in Path(folder).iterdir():
            node_id = request.name
            if request.suffix == ".done" or node_id == self._head_node_id:
                continue
            with self.lock:
                known = node_id in self._nodes
            if known:
                logger.warning(f"TerminableFakeProvider: terminating {node_id} as requested")
                self.terminate_node(node_id)
                for pid in pids_using(f"{NODE_ENV}={node_id}"):  # the instance is gone
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            request.rename(request.with_name(node_id + ".done"))
