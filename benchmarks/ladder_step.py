"""The K-member ladder step against K single-SAE steps on the same batches, same run.

At the local default's shape (d_in 128, d_sae 512, batch 512, fp32, CPU), one
``LadderTrainer.step`` (K members, batched matmuls, one fused Adam, no host sync)
against K steps of ladders of one (one target each) on the same batch, interleaved round by
round; the median of each is reported as member-tokens/s and as the ratio
ladder / (K single steps) (target: <= 0.8).

    python benchmarks/ladder_step.py [--k 6] [--threads 2] [--rounds 40] [--keep-freed-memory]

``--keep-freed-memory`` stops glibc returning the step's large freed buffers to the OS
(process-wide; run it as a separate invocation to compare).
"""

from __future__ import annotations

import argparse

import torch
from timing import median_times

from raysae.core.config import PenaltyConfig, SAEConfig, TrainConfig
from raysae.core.ladder import LadderTrainer
from raysae.core.memory import keep_freed_memory


def build(args: argparse.Namespace, penalty: PenaltyConfig) -> dict:
    """The two callables: one ladder step, and K single steps, on the same batch."""
    targets = [4.0 * 2 ** (i * 4 / max(args.k - 1, 1)) for i in range(args.k)]  # 4 .. 64
    cfg = TrainConfig(sae=SAEConfig(args.d_in, args.d_sae), penalty=penalty, lam=1.0,
                      batch_size=args.batch, total_tokens=args.batch * (args.rounds + 100),
                      device=args.device, log_every=10**9)
    x = torch.randn(args.batch, args.d_in, device=args.device)
    ladder = LadderTrainer(cfg, targets)
    singles = [LadderTrainer(cfg, [t]) for t in targets]

    def k_singles():
        for trainer in singles:
            trainer.step(x)

    return {"ladder step": lambda: ladder.step(x), f"{args.k} single steps": k_singles}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--d-in", type=int, default=128)
    parser.add_argument("--d-sae", type=int, default=512)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="call raysae.core.memory.keep_freed_memory() first (glibc)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory() if args.keep_freed_memory else False
    print(f"device={args.device} threads={torch.get_num_threads()} k={args.k} "
          f"d_in={args.d_in} d_sae={args.d_sae} batch={args.batch} rounds={args.rounds} "
          f"keep_freed_memory={kept}")
    print(f"{'penalty':<22}{'what':<18}{'ms':>9}{'member-tokens/s':>18}")
    for label, penalty in [("L1 (p=1)", PenaltyConfig.power(1.0)),
                           ("sqrt (p=0.5)", PenaltyConfig.power(0.5))]:
        times = median_times(build(args, penalty), args.rounds, args.device, warmup=3)
        for what, t in times.items():
            print(f"{label:<22}{what:<18}{t * 1e3:>9.2f}{args.k * args.batch / t:>18,.0f}")
        ens, single = times.values()
        print(f"{label:<22}ratio ladder / {args.k} single steps = {ens / single:.2f}")


if __name__ == "__main__":
    main()
