"""The arithmetic of a training step: bf16 autocast and TF32 matmuls, on by default on CUDA.

An Ampere or Hopper GPU multiplies fp32 matrices at a fraction of its TF32 and bf16
throughput (H100: 67 TFLOP/s fp32, 495 TF32, 990 bf16, dense), so a trial that left both
off would use an eighth of the chip. The master weights, Adam's state, the penalty and the
loss stay fp32 (raysae.core.penalties turns autocast off around the penalty). Evaluation
never runs under these settings: the spliced CE of every trial is computed at full fp32, so
CE stays comparable between trials trained with and without them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def uses_bf16(mode: str, device: torch.device) -> bool:
    """Whether a step on ``device`` runs its dense matmuls under bf16 autocast
    (``TrainConfig.autocast_bf16``: 'auto' on CUDA only, 'on' everywhere, 'off' never)."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """CUDA matmuls (and cuDNN convolutions) may use TF32 inside the block; the previous
    setting comes back after it, so evaluation in the same process stays full fp32."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before
