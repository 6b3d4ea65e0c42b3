"""Does a trial's GPU share hold its SAEs? The GPU memory of the cluster's GPU node types,
looked up from each autoscaler node type's EC2 ``InstanceType`` (or given with
--gpu-memory-gib), against one trial's memory estimate, before any node starts: a share too
small fails hours later, on a node the user is paying for, with a CUDA out-of-memory error.
"""

from __future__ import annotations

from raysae.settings import UserError

GPU_GIB = {"T4": 16, "A10G": 24, "L4": 24, "L40S": 48, "V100": 16, "V100-32GB": 32,
           "A100": 40, "A100-80GB": 80, "H100": 80, "H200": 141}
"""Memory of one GPU, GiB, as NVIDIA's and AWS's specifications state it (the driver keeps
a few hundred MiB of it for itself)."""

EC2_GPUS = {"g4dn": "T4", "g5": "A10G", "g6": "L4", "g6e": "L40S", "p3": "V100",
            "p3dn": "V100-32GB", "p4d": "A100", "p4de": "A100-80GB", "p5": "H100",
            "p5e": "H200", "p5en": "H200"}
"""EC2 instance family (the type's name before the dot) -> its GPU. Every size of a family
has the same GPU; families not listed are not checked unless --gpu-memory-gib is given."""


def ec2_gpu(instance_type: str | None) -> tuple[str, float] | None:
    """(GPU name, GiB per GPU) of an EC2 instance type such as ``g5.2xlarge``; None when
    the family is not in ``EC2_GPUS``."""
    family = str(instance_type or "").split(".", 1)[0]
    name = EC2_GPUS.get(family)
    return (name, float(GPU_GIB[name])) if name else None


def gpu_node_types(config: dict) -> list[tuple[str, str | None]]:
    """(node type name, its EC2 InstanceType or None) of every type in an autoscaler config
    whose stated resources include a GPU."""
    out = []
    for name, spec in (config.get("available_node_types") or {}).items():
        spec = spec or {}
        if float((spec.get("resources") or {}).get("GPU", 0) or 0) > 0:
            out.append((name, (spec.get("node_config") or {}).get("InstanceType")))
    return out


def share_gib(gpus_per_trial: float, gpu_gib: float) -> float:
    """GiB of one GPU a trial may use: its fraction of it (a trial of one GPU or more trains
    on one device, so never more than the whole GPU)."""
    return min(float(gpus_per_trial), 1.0) * gpu_gib


def fitting_share(need_gib: float, gpu_gib: float) -> float | None:
    """The smallest GPU share 1/n (n trials per GPU) whose memory holds ``need_gib``; None
    when not even a whole GPU does."""
    per_gpu = int(gpu_gib // need_gib) if need_gib > 0 else 1
    return 1.0 / per_gpu if per_gpu >= 1 else None


def check_gpu_share(config: dict, *, gpus: float, need_bytes: int,
                    gpu_memory_gib: float | None = None, live_gpu: bool = False) -> None:
    """Refuse a GPU share in which one trial's estimated memory fits on no GPU node type the
    autoscaler ``config`` may launch (without one: on the live GPU nodes, ``live_gpu``, whose
    memory only --gpu-memory-gib states). A type whose GPU is unknown (not in ``EC2_GPUS``,
    no --gpu-memory-gib) may fit, so it is never refused; nor is a CPU-only search."""
    if not gpus or need_bytes <= 0:
        return
    need = need_bytes / 1024**3
    types = gpu_node_types(config) or ([("live GPU node", None)] if live_gpu else [])
    known = []
    for name, instance in types:
        gpu = ("GPU", float(gpu_memory_gib)) if gpu_memory_gib else ec2_gpu(instance)
        if gpu is None:
            return
        known.append((share_gib(gpus, gpu[1]), gpu, name, instance))
    if not known or any(share >= need for share, *_ in known):
        return
    share, (gpu, gib), name, instance = max(known, key=lambda k: k[0])
    source = "--gpu-memory-gib" if gpu_memory_gib else instance
    fit = fitting_share(need, gib)
    fix = (f"pass --gpus-per-trial {fit:.3g} or more ({round(1 / fit)} trial(s) per GPU)"
           if fit else f"use a GPU node type with more than {need:.1f} GiB per GPU")
    raise UserError(f"--gpus-per-trial {gpus:g} gives each trial {share:.1f} GiB of one {gpu} "
                    f"({gib:g} GiB; node type {name}, {source}), but one trial needs about "
                    f"{need:.1f} GiB (its ladder's SAEs, gradients and Adam state, and the "
                    f"[members, batch, d_sae] step temporaries); {fix}, or lower --expansion, "
                    "--batch-size or the number of --targets")
