"""Can the cluster ever run one trial? Its CPU/GPU request and a memory estimate against the
Ray nodes (and the autoscaler's node types), checked after Ray starts and before any work."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from raysae.search.gpu_memory import check_gpu_share
from raysae.settings import UserError

AUTOSCALER_CONFIG = "~/ray_bootstrap_config.yaml"
"""Where `ray up` leaves the cluster's autoscaler config on the head node (env
RAYSAE_AUTOSCALER_CONFIG overrides): its node types are what the cluster could get."""


def _autoscaler_config() -> dict | None:
    """The autoscaler config ({} without one; None when it cannot be read)."""
    path = Path(os.path.expanduser(os.environ.get("RAYSAE_AUTOSCALER_CONFIG",
                                                  AUTOSCALER_CONFIG)))
    if not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except Exception:  # an unreadable config: what it allows is unknown
        return None


def autoscaler_node_types(with_counts: bool = False,
                          config: dict | None = None) -> list[dict] | None:
    """Resources of each node type the autoscaler may launch ([] without an autoscaler
    config; None when a type leaves its CPU/GPU count to detection, i.e. unknown here).
    ``with_counts``: each as {"resources": ..., "max_workers": how many it may launch,
    "head": whether it is the head's type}. ``config``: the config already read."""
    config = _autoscaler_config() if config is None else config
    if config is None:
        return None
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    cap = int(config.get("max_workers", 0) or 0)
    out = []
    for name, spec in types.items():
        resources = dict((spec or {}).get("resources") or {})
        if "CPU" not in resources:
            return None
        count = int((spec or {}).get("max_workers", cap) or 0) if name != head else 1
        out.append({"resources": resources, "max_workers": count, "head": name == head}
                   if with_counts else resources)
    return out


GPU_SHARE = 0.25
"""Default GPU share of a trial where the cluster has (or can launch) GPUs: a ladder at the
pythia-70m preset's shape leaves most of a GPU idle, so four trials share one."""


def default_gpus_per_trial(alive: dict) -> float:
    """``GPU_SHARE`` when a live node has GPUs or the autoscaler can launch a node type with
    GPUs (on the documented cluster none exists when the driver starts), else 0."""
    types = autoscaler_node_types() or []
    can_launch = any(float(t.get("GPU", 0) or 0) > 0 for t in types)
    return GPU_SHARE if float(alive.get("GPU", 0) or 0) > 0 or can_launch else 0.0


def trials_per_node(resources: dict, cpus: float, gpus: float) -> int:
    """How many trials asking ``cpus`` CPUs and ``gpus`` GPUs fit on one node at once."""
    fit = int(float(resources.get("CPU", 0) or 0) / cpus + 1e-9)  # cpus > 0 (SearchConfig)
    if gpus > 0:
        fit = min(fit, int(float(resources.get("GPU", 0) or 0) / gpus + 1e-9))
    return max(fit, 0)


def default_concurrency(alive: list[dict], cpus: float, gpus: float) -> int:
    """Trials that can run at once on the cluster at its largest: what fits on the live
    nodes plus, with an autoscaler config, on every worker it may launch (each type up to
    its max_workers, all types up to the cluster's max_workers); at least 1. On the
    documented cluster (4 GPU workers of {CPU: 4, GPU: 1}, trials of 1 CPU and 0.25 GPU)
    that is 16, though no worker exists when the driver starts."""
    config = _autoscaler_config() or {}
    types = autoscaler_node_types(with_counts=True, config=config) or []
    live = sum(trials_per_node(dict(n.get("Resources") or {}), cpus, gpus) for n in alive
               if n.get("Alive", True))
    if not types:
        return max(1, live)
    # The head as it is, every worker type at its max_workers (within the cluster's cap,
    # the types that fit most trials first); live workers are among those.
    workers = sorted((t for t in types if not t["head"]),
                     key=lambda t: -trials_per_node(t["resources"], cpus, gpus))
    left = int(config.get("max_workers", 0) or 0) or sum(t["max_workers"] for t in workers)
    most = sum(trials_per_node(t["resources"], cpus, gpus) for t in types if t["head"])
    for t in workers:
        n = min(t["max_workers"], left)
        most += n * trials_per_node(t["resources"], cpus, gpus)
        left -= n
    return max(1, live, most)


def trial_memory_bytes(d_in: int, d_sae: int, members: int, batch_size: int) -> int:
    """Rough float32 memory of one trial: per ladder member the SAE's weights, gradients and
    Adam's two moments (4 x the parameters), plus the step's [K, batch, d_sae] temporaries
    (pre-activations, activations and their gradients: about 4 per member)."""
    params = 2 * d_in * d_sae + d_sae + d_in
    return members * 4 * (4 * params + 4 * batch_size * d_sae)


def _gib(n: float) -> str:
    return f"{n / 1024**3:.1f} GiB"


def check_cluster(nodes: list[dict], *, cpus: float, gpus: float, memory: int,
                  address: str | None = None, gpu_memory_gib: float | None = None) -> None:
    """Refuse a search no node can ever run: one trial's CPU/GPU share or memory estimate
    above the largest node the cluster has (or, with an autoscaler config, could launch),
    or its GPU share too small for that estimate (raysae.search.gpu_memory)."""
    alive = [dict(n.get("Resources") or {}) for n in nodes if n.get("Alive", True)]
    check_gpu_share(_autoscaler_config() or {}, gpus=gpus, need_bytes=memory,
                    gpu_memory_gib=gpu_memory_gib,
                    live_gpu=any(float(r.get("GPU", 0) or 0) > 0 for r in alive))
    types = autoscaler_node_types()
    if types is None:  # node types of unknown size: the cluster may grow to fit
        return
    pool = alive + types
    where = f"the Ray cluster at {address}" if address else "the Ray cluster"
    where += f" ({len(alive)} node{'s' if len(alive) != 1 else ''}"
    where += f", {len(types)} autoscaler node types)" if types else ")"

    def most(key: str) -> float:
        return max((float(r.get(key, 0) or 0) for r in pool), default=0.0)

    if cpus > most("CPU"):
        raise UserError(f"--cpus-per-trial {cpus:g} asks for {cpus:g} CPUs per trial, but the "
                         f"largest node of {where} has {most('CPU'):g}; no trial could ever "
                         f"start; pass --cpus-per-trial {most('CPU'):g} or less, or add "
                         "bigger nodes")
    if gpus > most("GPU"):
        have = (f"the largest node of {where} has {most('GPU'):g}" if most("GPU")
                else f"no node of {where} has a GPU")
        raise UserError(f"--gpus-per-trial {gpus:g} asks for {gpus:g} GPUs per trial, but "
                         f"{have}; no trial could ever start; pass --gpus-per-trial "
                         f"{most('GPU'):g}{' or less' if most('GPU') else ''}, or add GPU nodes")
    room = max((float(r.get("memory", 0) or 0) + float(r.get("object_store_memory", 0) or 0)
                for r in pool), default=0.0)
    if room and memory > room:
        raise UserError(f"one trial needs about {_gib(memory)} of memory (its ladder's SAEs, "
                         f"gradients and Adam state, and the [members, batch, d_sae] step "
                         f"temporaries), but the largest node of {where} has {_gib(room)}; "
                         "lower --expansion, --batch-size or the number of --targets")
