"""Each kind's ladder outputs after a fixed number of steps on fixed batches, recorded once
and checked after every refactor of the trainer (tests/test_kind_records.py).

A case trains a small ladder (3 members) and keeps what a user gets: each member's saved
SAE tensors (the inference architecture's whole tensor set), its final lambda and its
logged metrics. ``python tests/kind_records.py --write`` re-records (only when a change of
results is intended, and said so in the commit). A refactor that keeps every operation
reproduces the records to float tolerance; one that only reorders arithmetic changes a step
by ~1e-7 relative, which these short, controller-driven runs amplify (to 1e-1 over 150
steps for the sqrt and p-anneal cases, measured when the fused penalty came in): such a
change is re-recorded, with its one-step difference measured first.

Another CPU amplifies the same way: its SIMD kernels and MKL's code path round differently
(records made on an AMD EPYC missed by up to 0.15 on an Intel Xeon; on one machine, ATen's
default kernels against its AVX-512 ones moved the sqrt cases by 0.13 after 150 steps). So
cases are recorded and checked in a child process with the math pinned (``PINNED_ENV``:
ATen's portable kernels, MKL's conditional-numerical-reproducibility mode COMPATIBLE), which
x86 CPUs compute alike.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from planted import planted_batches  # noqa: E402

from raysae.core.config import PenaltyConfig, SAEConfig, TrainConfig  # noqa: E402
from raysae.core.training import train_ladder  # noqa: E402

PINNED_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE",
              "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""Read when torch loads, so set for a child process (``pinned_run``)."""
RECORDS = Path(__file__).resolve().parent / "records"
TENSORS, METRICS = RECORDS / "kinds.safetensors", RECORDS / "kinds.json"
D_IN, D_SAE, STEPS, BATCH = 16, 64, 150, 64
TARGETS = (4.0, 8.0, 16.0)
LOGGED = ("l0", "mse", "fvu", "cos_sim", "l2_ratio", "loss", "recon_loss", "penalty_loss",
          "lam", "dead_fraction")

CASES: dict[str, dict] = {
    "relu-L1-free_norm": {"penalty": PenaltyConfig.power(1.0)},
    "relu-sqrt-free_norm": {"penalty": PenaltyConfig.power(0.5)},
    "relu-power-free_norm": {"penalty": PenaltyConfig.power(0.3, 0.1)},
    "relu-tanh-free_norm": {"penalty": PenaltyConfig("tanh", {"c": 2.0})},
    "relu-log-free_norm": {"penalty": PenaltyConfig("log", {"eps": 0.1})},
    "relu-sqrt-study": {"penalty": PenaltyConfig.power(0.5), "recipe": "study"},
    "relu-L1-saelens": {"penalty": PenaltyConfig.power(1.0), "recipe": "saelens"},
    "relu-sqrt-dense": {"penalty": PenaltyConfig.power(0.5), "sparse_step": "off"},
    "relu-sqrt-sparse": {"penalty": PenaltyConfig.power(0.5), "sparse_step": "on"},
    "panneal": {"kind": "panneal", "penalty": PenaltyConfig.power(0.4)},
    "topk": {"kind": "topk"},
    "topk-fixed_k": {"kind": "topk", "sparse_step": "on"},
    "batchtopk": {"kind": "batchtopk"},
    "batchtopk-fixed_k": {"kind": "batchtopk", "sparse_step": "on"},
    "jumprelu": {"kind": "jumprelu"},
    "matryoshka": {"kind": "matryoshka"},
}


def config(case: str) -> TrainConfig:
    return TrainConfig(sae=SAEConfig(D_IN, D_SAE), lam=0.1, total_tokens=BATCH * STEPS,
                       batch_size=BATCH, lr=3e-3, log_every=20, seed=5, control_gain=0.04,
                       dead_window_tokens=BATCH * 10, **CASES[case])


def run_case(case: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors keyed ``case/member/name``, metrics keyed by member)."""
    results = train_ladder(config(case), TARGETS,
                           planted_batches(D_IN, 48, 4, BATCH, seed=2, steps=STEPS))
    tensors, metrics = {}, {}
    for k, res in enumerate(results):
        sae = res.sae
        for name, value in sae.state_dict().items():
            tensors[f"{case}/{k}/{name}"] = value.detach().float().contiguous()
        metrics[str(k)] = {"status": res.status, "lam": res.lam,
                           "architecture": sae.architecture, "k": getattr(sae, "k", None),
                           "history": [{m: row[m] for m in LOGGED if m in row}
                                       for row in res.history]}
    return tensors, metrics


def run_all(tensors_path: Path, metrics_path: Path) -> None:
    """Every case, here (call it with the math pinned: ``pinned_run``)."""
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    tensors, metrics = {}, {}
    for case in CASES:
        t, m = run_case(case)
        tensors.update(t)
        metrics[case] = m
    save_file(tensors, str(tensors_path))
    metrics_path.write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")


def pinned_run(tensors_path: Path, metrics_path: Path) -> None:
    """``run_all`` in a child process with ``PINNED_ENV``."""
    import os
    import subprocess

    subprocess.run([sys.executable, __file__, "--to", str(tensors_path), str(metrics_path)],
                   env={**os.environ, **PINNED_ENV}, check=True, timeout=1200)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args == ["--write"]:  # re-record (the math pinned, in a child)
        RECORDS.mkdir(exist_ok=True)
        pinned_run(TENSORS, METRICS)
    elif len(args) == 3 and args[0] == "--to":
        run_all(Path(args[1]), Path(args[2]))
    else:
        raise SystemExit("usage: python tests/kind_records.py --write")
