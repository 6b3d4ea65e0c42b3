"""Activation batches from host memory to the trainer's device, overlapped with training.

The reader hands out batches in the cache's storage dtype (float16 halves the bytes that
cross PCIe), in pinned memory when CUDA is present (raysae.activations.reader). On CUDA,
``device_batches`` issues the copy of batch n+1 on a side stream before the trainer
queues step n, so the copy runs while the GPU computes; an event orders each batch's step
after its own copy only. ``to_compute`` is the trainer's one entry point: the copy first
(``non_blocking``: a no-op for a batch already on the device), the conversion to float32
after it, on the device, so no host thread converts dtypes and no step waits for one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def to_compute(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device`` in float32: copied in its own dtype, converted there."""
    return x.to(device, non_blocking=True).to(torch.float32)


def device_batches(batches: Iterable[torch.Tensor], device: torch.device | str,
                   ) -> Iterator[torch.Tensor]:
    """``batches`` on ``device`` in their own dtype; on CUDA copied one batch ahead on a side
    stream (see module doc); elsewhere passed through unchanged."""
    device = torch.device(device)
    if device.type != "cuda":
        yield from batches
        return
    stream = torch.cuda.Stream(device)

    def start(x: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        if not x.is_pinned():  # a pageable source (the live pipeline): pin it once here
            x = x.pin_memory()
        with torch.cuda.stream(stream):
            moved = x.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        return moved, done

    pending = None
    for x in batches:
        started = start(x)
        if pending is not None:
            yield _ready(*pending)
        pending = started
    if pending is not None:
        yield _ready(*pending)


def _ready(moved: torch.Tensor, done: torch.cuda.Event) -> torch.Tensor:
    """The batch, usable on the current stream: that stream waits for its copy (on the
    device, not the host) and the allocator keeps its memory until the step is done."""
    current = torch.cuda.current_stream(moved.device)
    current.wait_event(done)
    moved.record_stream(current)
    return moved
