"""Training-step throughput against its own floor, measured in the same run.

One step of raysae.core.train.Trainer (d_in=512, d_sae=2048, batch 4096, fp32, CPU by
default) versus the five matrix products that step cannot avoid (encoder
forward, decoder forward, decoder weight grad, feature grad, encoder weight grad).
The ratio step/floor says how much the penalty, the decoder constraint, Adam and
the bookkeeping cost on top of the linear algebra.

    python benchmarks/train_throughput.py [--steps 20] [--device cpu]
"""

from __future__ import annotations

import argparse

import torch
from timing import median_times

from raysae.core.config import PenaltyConfig, SAEConfig, TrainConfig
from raysae.core.train import Trainer


def matmul_floor(d_in: int, d_sae: int, batch: int, device: str):
    """The five products one step cannot avoid, as one callable."""
    x = torch.randn(batch, d_in, device=device)
    w_enc = torch.randn(d_in, d_sae, device=device)
    w_dec = torch.randn(d_sae, d_in, device=device)
    f = torch.randn(batch, d_sae, device=device)
    g = torch.randn(batch, d_in, device=device)

    def products():
        x @ w_enc  # encoder forward
        f @ w_dec  # decoder forward
        f.T @ g  # decoder weight gradient
        g @ w_dec.T  # gradient wrt features
        x.T @ f  # encoder weight gradient

    return products


def train_step(penalty: PenaltyConfig, d_in: int, d_sae: int, batch: int, device: str,
               rounds: int):
    """One Trainer.step on a fixed batch, as one callable."""
    cfg = TrainConfig(sae=SAEConfig(d_in, d_sae), penalty=penalty, lam=1.0, batch_size=batch,
                      total_tokens=batch * (rounds + 10), device=device, log_every=10**9)
    trainer = Trainer(cfg)
    x = torch.randn(batch, d_in, device=device)
    return lambda: trainer.step(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dims = (args.d_in, args.d_sae, args.batch, args.device)
    fns = {"matmul floor (5 products)": matmul_floor(*dims)}
    for label, penalty in [("step, L1 (p=1)", PenaltyConfig.power(1.0)),
                           ("step, sqrt (p=0.5)", PenaltyConfig.power(0.5)),
                           ("step, p=0.3 eps=0.01", PenaltyConfig.power(0.3, 0.01)),
                           ("step, tanh c=10", PenaltyConfig("tanh", {"c": 10.0})),
                           ("step, log eps=0.1", PenaltyConfig("log", {"eps": 0.1}))]:
        fns[label] = train_step(penalty, *dims, args.steps)
    times = median_times(fns, args.steps, args.device)
    floor = times["matmul floor (5 products)"]
    print(f"device={args.device} threads={torch.get_num_threads()} d_in={args.d_in} "
          f"d_sae={args.d_sae} batch={args.batch} rounds={args.steps}")
    print(f"{'what':<28}{'ms/step':>10}{'tokens/s':>14}{'x floor':>10}")
    for label, t in times.items():
        print(f"{label:<28}{t * 1e3:>10.1f}{args.batch / t:>14,.0f}{t / floor:>10.2f}")


if __name__ == "__main__":
    main()
