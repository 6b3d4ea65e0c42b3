"""The bare loops: the math of raysae's ladder step written plainly in eager PyTorch, the
baseline every step measurement compares with (benchmarks/step_count.py, gpu_check.py).
Frozen: a change here changes every ratio measured against it.

A case is a penalty and recipe, or a kind: ``L1`` and ``sqrt`` (the default ``free_norm``
recipe: free decoder norms, the penalty on f_i ||d_i||, each member's gradient norm clipped
at 1, fused Adam) and ``TopK`` (unit-norm decoder rows, the gradient along them removed,
AuxK on a given dead mask). K members are stacked as raysae stacks them; each has its own
lambda. What raysae's step does beyond this math (the L0 controller, dead-feature tracking,
NaN safety, the learning-rate schedule) is what it must make cheap.
"""

from __future__ import annotations

import torch

from raysae.core.config import PenaltyConfig, SAEConfig, TrainConfig
from raysae.core.ladder import LadderTrainer, tf32_matmuls

PRECISIONS = {"fp32": ("off", False), "tf32": ("off", True), "bf16": ("on", True)}
"""name -> (TrainConfig.autocast_bf16, TrainConfig.tf32)."""
CASES = {"L1": {"penalty": PenaltyConfig.power(1.0)},
         "sqrt": {"penalty": PenaltyConfig.power(0.5)},
         "TopK": {"kind": "topk"}}
"""case -> the TrainConfig fields of raysae's ladder for it."""
SQRT_FLOOR = 1e-4
"""The bare sqrt penalty is sqrt(u + floor) - sqrt(floor): finite gradients at 0."""


def shape(small: bool) -> dict:
    if small:
        return dict(d_in=128, d_sae=512, batch=512, targets=[4.0, 16.0, 64.0, 128.0])
    return dict(d_in=512, d_sae=2048, batch=4096, targets=[8.0, 16.0, 32.0, 64.0, 128.0, 256.0])


def raysae_ladder(s: dict, device: str, case: str, precision: str, **kw) -> LadderTrainer:
    """raysae's ladder for ``case`` at shape ``s`` (controller on, no logging steps)."""
    bf16, tf32 = PRECISIONS[precision]
    cfg = TrainConfig(sae=SAEConfig(s["d_in"], s["d_sae"]), batch_size=s["batch"],
                      total_tokens=s["batch"] * 10**6, device=device, log_every=10**9,
                      autocast_bf16=bf16, tf32=tf32, sparse_step="off",
                      **{**CASES[case], **kw})
    return LadderTrainer(cfg, s["targets"])


def bare_loop(s: dict, device: str, case: str, precision: str):
    """One step of the bare loop for ``case`` (module doc): a function of the batch."""
    k, d_in, d_sae = len(s["targets"]), s["d_in"], s["d_sae"]
    g = torch.Generator().manual_seed(0)
    w_dec = torch.randn(k, d_sae, d_in, generator=g)
    w_dec /= w_dec.norm(dim=-1, keepdim=True)
    w_enc = w_dec.transpose(1, 2).contiguous().to(device).requires_grad_()
    w_dec = w_dec.to(device).requires_grad_()
    b_enc = torch.zeros(k, d_sae, device=device, requires_grad=True)
    b_dec = torch.zeros(k, d_in, device=device, requires_grad=True)
    params = [w_enc, w_dec, b_enc, b_dec]
    opt = torch.optim.Adam(params, lr=1e-3, fused=True)
    lam = torch.full((k,), 1e-2, device=device)
    ks = [max(1, round(t)) for t in s["targets"]]
    keep = (torch.arange(max(ks)) < torch.tensor(ks).unsqueeze(1)).unsqueeze(1).to(device)
    dead = torch.zeros(k, d_sae, dtype=torch.bool, device=device)
    bf16, tf32 = PRECISIONS[precision]
    dev = torch.device(device)

    def step(x: torch.Tensor) -> None:
        x = x.to(dev)
        with tf32_matmuls(tf32):
            with torch.autocast(dev.type, torch.bfloat16, enabled=bf16 == "on"):
                pre = torch.baddbmm(b_enc.unsqueeze(1), x - b_dec.unsqueeze(1), w_enc)
                if case == "TopK":
                    vals, idx = pre.relu().topk(max(ks), dim=-1)
                    f = torch.zeros_like(pre).scatter(-1, idx, vals * keep)
                else:
                    f = pre.relu()
                x_hat = torch.baddbmm(b_dec.unsqueeze(1), f, w_dec)
                if case == "TopK":  # AuxK: dead features reconstruct the residual
                    e = (x - x_hat).detach()
                    cand = torch.where(dead.unsqueeze(1), pre.relu(), float("-inf"))
                    v, i = cand.topk(d_in // 2, dim=-1)
                    aux_f = torch.zeros_like(pre).scatter(-1, i, torch.where(v.isfinite(), v, 0))
                    aux = (e - torch.bmm(aux_f, w_dec)).float().pow(2).sum(-1).mean(-1)
                    aux = aux / e.float().pow(2).sum(-1).mean(-1) / 32 * dead.any(-1)
            recon = (x_hat.float() - x).pow(2).sum(-1).mean(-1)
            if case == "TopK":
                loss = recon + aux
            else:
                fn = f * w_dec.norm(dim=-1).unsqueeze(1)
                if case == "L1":
                    pen = fn.sum(-1, dtype=torch.float32)
                else:
                    pen = ((fn.float() + SQRT_FLOOR).sqrt() - SQRT_FLOOR**0.5).sum(-1)
                loss = recon + lam * pen.mean(-1)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            with torch.no_grad():
                if case == "TopK":  # unit rows: drop the gradient along them
                    w_dec.grad -= (w_dec.grad * w_dec).sum(-1, keepdim=True) * w_dec
                else:  # each member's gradient norm clipped at 1
                    norm = torch.stack([p.grad.flatten(1).norm(dim=1) for p in params]).norm(
                        dim=0)
                    factor = (1.0 / (norm + 1e-6)).clamp_max(1.0)
                    for p in params:
                        p.grad.mul_(factor.view(-1, *[1] * (p.ndim - 1)))
            opt.step()
            if case == "TopK":
                with torch.no_grad():
                    w_dec.div_(w_dec.norm(dim=-1, keepdim=True))

    return step
