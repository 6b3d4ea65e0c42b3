"""Connect to a Ray cluster when one exists, else start a small local Ray: searches run unchanged.

Resolution order for the address (first hit wins):

1. the ``address`` argument;
2. env ``RAYSAE_RAY_ADDRESS``, then env ``RAY_ADDRESS``;
3. the cluster that ``ray start`` recorded on this machine (``/tmp/ray/ray_current_cluster``;
   on a ``ray up`` head node this is the cluster), if its GCS port answers;
4. otherwise an embedded local Ray bound to 127.0.0.1.

Step 3 is what ``ray.init(address="auto")`` tries first. Its legacy fallback (attach to *any*
GCS process found with ``ps``) is deliberately skipped: on a shared machine it would attach a
search to another user's or another test's throwaway Ray. ``address="local"`` forces step 4.
Every probe is a socket connect with a 1 s timeout, so having no cluster costs well under a
second.
"""

from __future__ import annotations

import os
import socket

import ray
from ray._private.authentication.authentication_token_setup import (
    maybe_enable_token_auth_if_token_available,
)
from ray._private.services import get_webui_url_from_internal_kv
from ray._private.utils import read_ray_address

from raysae.cluster.reaper import start_reaper
from raysae.settings import UserError

LOCAL_OBJECT_STORE_BYTES = 300 * 1024**2
"""Object store for the embedded local Ray: small, since this is a laptop-scale fallback."""

ADDRESS_ENV_VARS = ("RAYSAE_RAY_ADDRESS", "RAY_ADDRESS")


def _env_address() -> str | None:
    """The first non-empty address from the environment, if any."""
    for name in ADDRESS_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def _recorded_address() -> str | None:
    """The GCS address that ``ray start`` wrote on this machine, or None."""
    return read_ray_address() or None


def _reachable(address: str, timeout: float = 1.0) -> bool:
    """True when ``host:port`` accepts a TCP connection within ``timeout`` seconds."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return False
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


class ClusterUnreachable(UserError, ConnectionError):
    """No Ray cluster answers at the address given (or 'auto' found none)."""


def _resolve(address: str | None) -> tuple[str | None, bool]:
    """(address to connect to or None for local, whether it came from ``ray start``'s record)."""
    explicit = address.strip() if address else _env_address()
    if explicit == "local":
        return None, False
    if explicit and explicit != "auto":
        if "://" not in explicit and not _reachable(explicit):
            raise ClusterUnreachable(
                f"no Ray cluster answers at {explicit!r}: check the address (host:port of the "
                "head's GCS, default port 6379), or unset RAYSAE_RAY_ADDRESS/RAY_ADDRESS"
            )
        return explicit, False
    recorded = _recorded_address()
    if recorded and _reachable(recorded):
        return recorded, True
    if explicit == "auto":
        raise ClusterUnreachable(
            "address='auto' but no running Ray cluster was found on this machine: start one "
            "with `ray start --head` or `ray up cluster.yaml`, or pass no address to run locally"
        )
    return None, False


def resolve_address(address: str | None = None) -> str | None:
    """The cluster address to connect to, or None to start a local Ray (see module doc)."""
    return _resolve(address)[0]


def _node():
    """Ray's node object for this driver (private API; None when not available)."""
    return getattr(ray._private.worker, "_global_node", None)


def dashboard_url() -> str | None:
    """``http://host:port`` of the dashboard of the connected Ray, or None (no dashboard/Ray)."""
    if not ray.is_initialized():
        return None
    url = os.environ.get("RAY_OVERRIDE_DASHBOARD_URL") or getattr(_node(), "webui_url", None)
    if not url and _node() is not None:
        # A driver that connected before the head's dashboard was up cached None: ask the GCS.

        url = get_webui_url_from_internal_kv()
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def ray_info() -> dict:
    """Address, dashboard URL, mode and total resources of the connected Ray."""
    node = _node()
    local = bool(getattr(node, "ray_init_cluster", False))
    return {
        "address": getattr(node, "gcs_address", None),
        "dashboard_url": dashboard_url(),
        "mode": "local" if local else "cluster",
        "resources": dict(ray.cluster_resources()),
    }


def _use_node_token() -> None:
    """An explicit ``ray.init(address=...)`` sends this machine's Ray token only in token
    mode; turn it on (Ray's own helper, which also refreshes its cached config) when a token
    exists (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN``) and the user set no RAY_AUTH_MODE, so
    ``--address HOST:PORT`` reaches a token-authenticated cluster as ``ray.init()`` on its
    head does."""
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    include_dashboard: bool = True,
    object_store_memory: int | None = None,
) -> dict:
    """Connect to a cluster or start a local Ray; returns ``ray_info()``. Idempotent.

    Resource arguments apply only to a local Ray (a cluster's resources are its nodes');
    passing them while connecting is ignored rather than an error, so one call site serves
    both. When Ray is already initialised nothing changes and its info is returned.
    """
    for name, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if ray.is_initialized():
        return ray_info()
    target, recorded = _resolve(address)
    if target is not None:
        # "auto" for the recorded cluster: Ray then also picks up a token the node holds
        # (~/.ray/auth_token) without RAY_AUTH_MODE, as `ray.init()` does on a head node.
        if not recorded:
            _use_node_token()
        ray.init(address="auto" if recorded else target)
        return ray_info()
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=include_dashboard,
        dashboard_host="127.0.0.1",
        object_store_memory=object_store_memory or LOCAL_OBJECT_STORE_BYTES,
    )

    if (node := _node()) is not None:  # no Ray process outlives a SIGKILLed driver
        start_reaper(node.get_session_dir_path())
    return ray_info()
