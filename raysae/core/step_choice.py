"""Which step a ladder takes: dense batched matmuls, the relu sparse step
(raysae.core.sparse_step) or the fixed-k decoder (raysae.core.fixed_k), from
``TrainConfig.sparse_step``, the kind, the device and the measured break-even points."""

from __future__ import annotations

SPARSE_STEP_MAX_DENSITY = 1 / 10
"""``sparse_step = "auto"`` uses the sparse step after a logging step whose members' mean L0
is at most this fraction of d_sae (its cost follows the active entries of all members).
Measured on 2 CPU cores (benchmarks/train_throughput.py, d_in 512, d_sae 2048, batch 4096):
sparse / dense step time 0.27 at 2% density, 0.46 at 6%, 0.74 at 12.5%, 1.36 at 25%; at
the local default (d_in 128, d_sae 512, batch 512, ladder 4..128, mean density 8%): 0.89
(L1) and 0.65 (sqrt); twice as dense: 1.32 and 0.94."""

FIXED_K_AUTO = False
"""Whether ``sparse_step = "auto"`` picks the fixed-k decoder for TopK and BatchTopK (at most
``SPARSE_STEP_MAX_DENSITY`` of d_sae per token). Off: benchmarks/gpu_check.py measured it
slower than the dense decoder everywhere: H200 bf16, d_in 512, d_sae 2048, batch 4096,
0.25x the dense step's speed on the ladder 8..256 and 0.43x on 8..128; 2 CPU cores, d_sae
512: 0.50x on 4..128, 0.84-0.95x on 4..16 (embedding_bag's backward sorts the indices)."""


def sparse_step_now(trainer) -> bool:
    """Whether this step uses a sparse step (``TrainConfig.sparse_step``): for fixed-k
    kinds the fixed-k decoder, only when asked ("on": no sync, but measured slower than
    the dense decoder on CPU and on an H200, see ``FIXED_K_AUTO``), for relu kinds the
    relu sparse step ("auto": on CPU, after a logging step with a low L0)."""
    mode = trainer.cfg.sparse_step
    if mode == "off":
        return False
    if trainer.kind.fixed_k:
        return mode == "on" or (FIXED_K_AUTO and trainer.kind.fixed_k_l0(trainer.model)
                                <= SPARSE_STEP_MAX_DENSITY * trainer.cfg.sae.d_sae)
    if not trainer.kind.sparse_step:
        return False
    return mode == "on" or (trainer.device.type == "cpu" and trainer.sparse_auto)
