"""Does ``--compile on`` pay on this machine? Per kind, at the local default's shape (d_in
128 -> d_sae 512, batch 512, ladder 4 .. 128): the eager step (the default ``sparse_step
auto``, which on a CPU takes the relu sparse step once L0 is low), the compiled dense step,
and the compilation's seconds, first in this process and again with Inductor's caches warm
(a reused trial process). The break-even: steps a trial must run before compiling has
paid for itself, against the default trial's steps (500k tokens / 512 = 976).

    python benchmarks/compile_check.py [--steps 60] [--json out.json]

Time it on a quiet machine (no tests or searches beside it); the load is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from planted import planted_batches  # noqa: E402
from record import FINDINGS, write_record  # noqa: E402

from raysae.core.config import PenaltyConfig, SAEConfig, TrainConfig  # noqa: E402
from raysae.core.ladder import LadderTrainer  # noqa: E402

CASES = {"sqrt": {"penalty": PenaltyConfig.power(0.5)}, "L1": {"penalty": PenaltyConfig.power(1)},
         "topk": {"kind": "topk"}, "batchtopk": {"kind": "batchtopk"},
         "jumprelu": {"kind": "jumprelu"}}
TARGETS = [4.0, 8.0, 16.0, 32.0, 64.0, 128.0]
DEFAULT_STEPS = 500_000 // 512


def trainer(case: str, compiled: bool, steps: int) -> LadderTrainer:
    cfg = TrainConfig(sae=SAEConfig(128, 512), batch_size=512, total_tokens=512 * steps * 4,
                      log_every=50, compile="on" if compiled else "off",
                      sparse_step="off" if compiled else "auto", **CASES[case])
    return LadderTrainer(cfg, TARGETS)


def seconds_per_step(t: LadderTrainer, batches: list, skip: int) -> float:
    for x in batches[:skip]:  # the first logging step switches to the sparse step (CPU)
        t.step(x)
    start = time.perf_counter()
    for x in batches[skip:]:
        t.step(x)
    return (time.perf_counter() - start) / (len(batches) - skip)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per series")
    parser.add_argument("--json", type=Path, default=FINDINGS / "compile_check.json",
                        help="where the record goes (default: the committed findings)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as a trial (TrialSpec.torch_threads)
    load = os.getloadavg()[0]
    batches = list(planted_batches(128, 1024, 24, 512, seed=1, steps=args.steps + 60))
    rows = []
    print(f"load {load:.2f}; {args.steps} timed steps after 60; default trial "
          f"{DEFAULT_STEPS} steps")
    print(f"{'case':<10} {'eager ms':>9} {'compiled ms':>12} {'compile s':>10} "
          f"{'again s':>8} {'break-even steps':>17}")
    for case in CASES:
        eager = seconds_per_step(trainer(case, False, args.steps), batches, 60)
        torch._dynamo.reset()
        first = trainer(case, True, args.steps)
        compiled = seconds_per_step(first, batches, 60)
        torch._dynamo.reset()  # a new trainer in the same process: Inductor's caches warm
        again = trainer(case, True, args.steps)
        again.step(batches[0])
        saved = eager - compiled
        even = again.compile_seconds / saved if saved > 0 else float("inf")
        rows.append({"case": case, "eager_ms": eager * 1e3, "compiled_ms": compiled * 1e3,
                     "compile_seconds": first.compile_seconds,
                     "compile_seconds_warm": again.compile_seconds,
                     "break_even_steps": even})
        print(f"{case:<10} {eager * 1e3:>9.2f} {compiled * 1e3:>12.2f} "
              f"{first.compile_seconds:>10.1f} {again.compile_seconds:>8.1f} {even:>17.0f}")
    print(f"load after {os.getloadavg()[0]:.2f}")
    write_record(args.json, {"rows": rows, "default_trial_steps": DEFAULT_STEPS}, load)


if __name__ == "__main__":
    main()
