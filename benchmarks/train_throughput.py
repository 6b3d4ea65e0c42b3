"""Training-step throughput against a bare PyTorch loop and the GEMM ideal, same run.

Shape of issue #16: d_in 512, d_sae 2048, batch 4096, fp32 (CPU by default). The SAE
starts with its encoder bias set so that about ``--l0`` features fire per token (what the
L0 controller converges to: 1-3% of d_sae), and every series trains on the same batch:

- bare loop: a plain PyTorch SAE step (relu, MSE + lambda * penalty, backward, Adam), the
  loop a researcher writes first; SAELens's step measured 0.88-0.91 of it (issue #16);
- GEMM ideal: the five dense products a dense step cannot avoid (no elementwise work);
- raysae's step of one SAE (a ladder of one) dense (``sparse_step="off"``) and sparse
  (``"on"``) for p in {1, 0.5, 0.25} and a searched point (p 0.3, eps 0.01); "x bare"
  compares each with the bare loop of the same penalty.

Printed: ms/step, tokens/s, the ratio of tokens/s to the bare loop's and to the GEMM
ideal's (> 1: faster), and the L0 during the run. Then the same-loss check: dense and
sparse ladders of one from one init on the same ``--check-steps`` batches, final losses.

    python benchmarks/train_throughput.py [--rounds 10] [--device cpu] [--l0 40]
"""

from __future__ import annotations

import argparse
import os

import torch
from timing import median_times

from raysae.core.config import PenaltyConfig, SAEConfig, TrainConfig
from raysae.core.ladder import LadderTrainer
from raysae.core.penalties import penalty_per_token
from raysae.core.training import ladder_of_one

PENALTIES = [("L1 (p=1)", PenaltyConfig.power(1.0)), ("sqrt (p=.5)", PenaltyConfig.power(0.5)),
             ("p=.25", PenaltyConfig.power(0.25)), ("p=.3 eps=.01", PenaltyConfig.power(0.3, 0.01))]


def gemm_ideal(x: torch.Tensor, d_sae: int):
    """The five products of a dense step, as one callable."""
    b, d_in = x.shape
    w_enc, w_dec = torch.randn(d_in, d_sae).to(x), torch.randn(d_sae, d_in).to(x)
    f, g = torch.randn(b, d_sae).to(x), torch.randn(b, d_in).to(x)

    def products():
        x @ w_enc, f @ w_dec, f.T @ g, g @ w_dec.T, x.T @ f

    return products


def sparse_bias(x: torch.Tensor, w_enc: torch.Tensor, l0: float) -> torch.Tensor:
    """An encoder bias under which about ``l0`` features fire per token of ``x``."""
    pre = (x[:512] @ w_enc).detach()
    return -torch.quantile(pre.flatten().float(), 1 - l0 / w_enc.shape[1])


def bare_loop(x: torch.Tensor, d_sae: int, l0: float, penalty: PenaltyConfig):
    """A plain PyTorch SAE training step (the baseline), as one callable."""
    d_in = x.shape[1]
    w_enc = torch.nn.Parameter(torch.randn(d_in, d_sae).to(x) / d_in**0.5)
    w_dec = torch.nn.Parameter(w_enc.detach().T.clone())
    b_enc = torch.nn.Parameter(torch.full((d_sae,), float(sparse_bias(x, w_enc, l0))).to(x))
    b_dec = torch.nn.Parameter(torch.zeros(d_in).to(x))
    opt = torch.optim.Adam([w_enc, w_dec, b_enc, b_dec], lr=1e-4)

    def step():
        f = torch.relu((x - b_dec) @ w_enc + b_enc)
        x_hat = f @ w_dec + b_dec
        pen = penalty_per_token(penalty.name, f, penalty.params).mean()
        loss = (x_hat - x).pow(2).sum(-1).mean() + 0.1 * pen
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def trainer(x: torch.Tensor, d_sae: int, l0: float, penalty: PenaltyConfig, mode: str,
            total: int, log_every: int = 10**9) -> LadderTrainer:
    """A raysae ladder of one at the benchmark's sparsity (lambda fixed, no warm-up)."""
    cfg = TrainConfig(sae=SAEConfig(x.shape[1], d_sae), penalty=penalty, lam=0.1, lr=1e-4,
                      batch_size=x.shape[0], total_tokens=x.shape[0] * total, device=str(x.device),
                      log_every=log_every, lam_warmup_frac=0.0, sparse_step=mode,
                      activation_scale=1.0)
    t = ladder_of_one(cfg)  # no l0_target: lambda fixed at cfg.lam
    model = t.model
    with torch.no_grad():
        model.b_enc.fill_(float(sparse_bias(x - model.b_dec[0], model.W_enc[0], l0)))
    return t


def measured_l0(t: LadderTrainer, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((t.model.pre_acts(x) > 0).sum(-1).float().mean())


def same_loss_check(args, x_all: list[torch.Tensor]) -> None:
    """Dense and sparse ladders of one from one init on the same batches: final losses."""
    for label, penalty in PENALTIES[:2]:
        losses = {}
        for mode in ("off", "on"):
            t = trainer(x_all[0], args.d_sae, args.l0, penalty, mode, len(x_all), len(x_all))
            rows = [t.step(x) for x in x_all]
            losses[mode] = rows[-1][0]["loss"], rows[-1][0]["l0"]
        (dl, d0), (sl, s0) = losses["off"], losses["on"]
        print(f"same data, {len(x_all)} steps, {label}: final loss dense {dl:.8g} sparse "
              f"{sl:.8g} (rel diff {abs(sl - dl) / dl:.1e}); L0 {d0:.1f} / {s0:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--l0", type=float, default=40.0)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--check-steps", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}; device={args.device} "
          f"threads={torch.get_num_threads()} d_in={args.d_in} d_sae={args.d_sae} "
          f"batch={args.batch} target L0 {args.l0:g} rounds={args.rounds}")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.d_in, generator=gen).to(args.device)
    fns = {"GEMM ideal (5 products)": gemm_ideal(x, args.d_sae)}
    trainers, bare_of = {}, {}
    for label, penalty in PENALTIES:
        fns[f"bare loop, {label}"] = bare_loop(x, args.d_sae, args.l0, penalty)
        for mode in ("off", "on"):
            name = f"raysae {'sparse' if mode == 'on' else 'dense '}, {label}"
            trainers[name] = trainer(x, args.d_sae, args.l0, penalty, mode, 4 * args.rounds + 10)
            fns[name], bare_of[name] = (lambda t: lambda: t.step(x))(trainers[name]), label
    times = median_times(fns, args.rounds, args.device)
    ideal = times["GEMM ideal (5 products)"]
    print(f"{'what':<34}{'ms/step':>9}{'tokens/s':>11}{'x bare':>8}{'x GEMM':>8}{'L0':>7}")
    for name, t in times.items():
        label = bare_of.get(name, name.split(", ", 1)[-1] if "bare" in name else "L1 (p=1)")
        bare = times[f"bare loop, {label}"]
        l0 = f"{measured_l0(trainers[name], x):7.1f}" if name in trainers else ""
        print(f"{name:<34}{t * 1e3:>9.1f}{args.batch / t:>11,.0f}{bare / t:>8.2f}"
              f"{ideal / t:>8.2f}{l0}")
    same_loss_check(args, [torch.randn(args.batch, args.d_in, generator=gen).to(args.device)
                           for _ in range(args.check_steps)])


if __name__ == "__main__":
    main()
