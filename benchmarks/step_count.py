"""Count what one training step does, without a GPU: aten ops, full-size passes and the bytes
non-matmul ops move, for raysae's ladder step and a bare loop of the same math.

    python benchmarks/step_count.py [--small] [--json out.json]

One step runs on the CPU at the GPU shape (d_in 512 -> d_sae 2048, batch 4096, a 6-SAE ladder
8 .. 256; ``--small``: the local default's) under a ``TorchDispatchMode`` that sees every aten
op; bf16 runs under CPU autocast, standing in for CUDA's (the same ops are dispatched). For
each op that is neither a view nor a matmul (mm, bmm, baddbmm, addmm, embedding_bag's
products are counted as matmuls):

- ops: how many were dispatched (each is a kernel launch on a GPU);
- full-size passes: the elements of every input and output of at least 1/64 of the ladder's
  feature size, in units of that size ([K, B, d_sae] elements): a pass over memory of that
  size on a GPU (a tensor processed in chunks counts its chunks' share);
- non-matmul bytes: every input and output's bytes (what those ops move through memory).

Series: the bare loop (benchmarks/bare_loop.py: the same math written plainly in eager
PyTorch, frozen), raysae's step as it is. The ratios compare raysae's step with the bare loop
of the same math. Counts are deterministic; nothing here is timed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bare_loop import CASES, PRECISIONS, bare_loop, raysae_ladder, shape  # noqa: E402
from record import FINDINGS, write_record  # noqa: E402

MATMULS = {"mm", "bmm", "baddbmm", "addmm", "addbmm", "matmul", "_embedding_bag",
           "_embedding_bag_backward", "_embedding_bag_dense_backward",
           "_embedding_bag_per_sample_weights_backward"}
VIEWS = {"view", "_unsafe_view", "expand", "as_strided", "t", "transpose", "unsqueeze",
         "squeeze", "permute", "slice", "select", "detach", "alias", "_reshape_alias",
         "reshape", "unbind", "split", "split_with_sizes", "lift_fresh", "clone_view",
         "view_as", "_to_copy_view", "_foreach_view"}


class StepCounter(TorchDispatchMode):
    """Counts every dispatched aten op (module doc); ``full`` is the feature tensor's size."""

    def __init__(self, full: int) -> None:
        super().__init__()
        self.full, self.ops, self.passes, self.bytes, self.matmuls = full, 0, 0.0, 0, 0
        self.by_op: dict[str, float] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in VIEWS:
            return out
        if name in MATMULS:
            self.matmuls += 1
            return out
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        self.ops += 1
        full = sum(t.numel() / self.full for t in tensors if t.numel() * 64 >= self.full)
        self.passes += full
        self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        if full:
            self.by_op[name] = round(self.by_op.get(name, 0) + full, 2)
        return out


def count(step, x: torch.Tensor, full: int) -> StepCounter:
    step(x)  # warm: the first step sets the activation scale and fills the kinds' caches
    counter = StepCounter(full)
    with counter:
        step(x)
    return counter


def measure(small: bool, cases=tuple(CASES), precisions=tuple(PRECISIONS)) -> list[dict]:
    from raysae.core import kinds

    kinds.CPU_CHUNKS = False  # count the CUDA step: no CPU-only chunking
    s = shape(small)
    full = len(s["targets"]) * s["batch"] * s["d_sae"]
    x = torch.randn(s["batch"], s["d_in"]) * 3
    rows = []
    for case in cases:
        for precision in precisions:
            bare = count(bare_loop(s, "cpu", case, precision), x, full)
            trainer = raysae_ladder(s, "cpu", case, precision)
            ours = count(trainer.step, x, full)
            for name, c in (("bare loop", bare), ("raysae", ours)):
                rows.append({"case": case, "precision": precision, "series": name,
                             "ops": c.ops, "matmuls": c.matmuls, "full_passes": c.passes,
                             "non_matmul_gb": c.bytes / 1e9,
                             "passes_vs_bare": c.passes / max(bare.passes, 1),
                             "bytes_vs_bare": c.bytes / max(bare.bytes, 1),
                             "full_size_ops": dict(sorted(c.by_op.items()))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="the local default's shape")
    parser.add_argument("--case", action="append", choices=list(CASES), default=None)
    parser.add_argument("--precision", action="append", choices=list(PRECISIONS), default=None)
    parser.add_argument("--json", type=Path, default=FINDINGS / "step_count.json",
                        help="where the record goes (default: the committed findings)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    rows = measure(args.small, tuple(args.case or CASES), tuple(args.precision or PRECISIONS))
    print(f"{'case':<6} {'prec':<5} {'series':<10} {'ops':>5} {'full passes':>12} "
          f"{'non-matmul GB':>14} {'passes/bare':>12} {'bytes/bare':>11}")
    for r in rows:
        print(f"{r['case']:<6} {r['precision']:<5} {r['series']:<10} {r['ops']:>5} "
              f"{r['full_passes']:>12.1f} {r['non_matmul_gb']:>14.2f} "
              f"{r['passes_vs_bare']:>12.2f} {r['bytes_vs_bare']:>11.2f}")
    write_record(args.json, {"shape": shape(args.small), "rows": rows}, None)


if __name__ == "__main__":
    main()
