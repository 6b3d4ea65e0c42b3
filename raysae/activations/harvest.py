"""Harvest an LM hook's activations with Ray Data.

    token blocks -> map_batches(Harvester) on an actor pool (LM run only up to the hooked
    layer, one GPU per actor when there are GPUs) -> rows {block_id, pos, token, act}
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch

from raysae.activations.source import ActivationSource, source_blocks, to_storage
from raysae.cluster.monitoring import HarvestMetrics
from raysae.lm.models import hook_activations, load_model, stop_layer


class Harvester:
    """Ray Data callable class: token blocks -> activation rows (model loaded once per actor)."""

    def __init__(self, src: ActivationSource):
        self.src = src
        self.model = load_model(src.model)
        self.stop = stop_layer(self.model, src.hook)
        self.metrics = HarvestMetrics(src.model, src.hook)

    def __call__(self, batch: dict) -> dict:
        src, start_time = self.src, time.perf_counter()
        tokens = torch.from_numpy(np.array(batch["tokens"], dtype=np.int64))
        acts = hook_activations(self.model, tokens, src.hook, stop=self.stop)
        start = int(src.bos_dropped)
        n, ctx = tokens.shape
        pos = np.arange(start, ctx)
        block_id = np.repeat(np.asarray(batch["block_id"], dtype=np.int64), ctx - start)
        pos = np.tile(pos, n)
        keep = block_id * src.tokens_per_block + (pos - start) < src.n_tokens
        flat = acts[:, start:].reshape(-1, acts.shape[-1])[torch.from_numpy(keep)]
        self.metrics.record(int(keep.sum()), time.perf_counter() - start_time)
        return {"block_id": block_id[keep], "pos": pos[keep].astype(np.int16),
                "token": tokens[:, start:].reshape(-1).numpy()[keep].astype(np.int32),
                "act": to_storage(flat, src.dtype)}


def harvest_dataset(src: ActivationSource, blocks: np.ndarray, block_ids: np.ndarray):
    """The lazy Ray Dataset of activation rows for the given blocks."""
    # on use: Ray Data (0.7 s to import) only for a cache build; the readers import this module
    import pyarrow as pa
    import ray
    from ray.data.extensions import ArrowTensorArray

    if not ray.is_initialized():
        ray.init()
    ray.data.DataContext.get_current().enable_progress_bars = False  # callers show their own
    gpus = ray.cluster_resources().get("GPU", 0)
    cpus = ray.cluster_resources().get("CPU", 1)
    size = src.num_actors or (int(gpus) if gpus else max(1, int(cpus // src.cpus_per_actor)))
    step = src.batch_blocks
    tables = [pa.table({"block_id": block_ids[i : i + step],
                        "tokens": ArrowTensorArray.from_numpy(blocks[i : i + step])})
              for i in range(0, len(blocks), step)]
    ds = ray.data.from_arrow(tables)
    return ds.map_batches(
        Harvester, fn_constructor_kwargs={"src": src}, batch_size=step, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=size), num_gpus=1 if gpus else 0,
        num_cpus=src.cpus_per_actor,
    )


def iter_harvest(src: ActivationSource, blocks: np.ndarray | None = None,
                 skip_blocks: set[int] | None = None, *,
                 in_process: bool = False, order: np.ndarray | None = None) -> Iterator[dict]:
    """Run the pipeline; yield its output batches (each holds whole blocks) as numpy dicts.
    ``in_process``: run the model here, on this process's device (a trial's own GPU share),
    instead of a Ray Data actor pool that would ask for GPUs of its own. ``order``: the
    block indices in the order to harvest them (default: corpus order); rows keep each
    block's index in ``blocks`` as ``block_id``."""
    blocks = source_blocks(src) if blocks is None else blocks
    ids = np.arange(len(blocks)) if order is None else np.asarray(order, dtype=np.int64)
    if skip_blocks:
        ids = ids[~np.isin(ids, np.fromiter(skip_blocks, dtype=np.int64))]
    if len(ids) == 0:
        return
    if in_process:
        yield from _harvest_here(src, blocks[ids], ids)
        return
    ds = harvest_dataset(src, blocks[ids], ids)
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def _harvest_here(src: ActivationSource, blocks: np.ndarray, ids: np.ndarray):
    harvester, step = Harvester(src), src.batch_blocks
    with torch.inference_mode():
        for i in range(0, len(blocks), step):
            yield harvester({"tokens": blocks[i : i + step], "block_id": ids[i : i + step]})
