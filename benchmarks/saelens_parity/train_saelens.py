"""Train one SAELens SAE (StandardTrainingSAE with L1, or TopKTrainingSAE) on a raysae
activation cache with SAELens's own SAETrainer, and save it in SAELens's inference layout.

Runs in SAELens's own venv (make_venv.sh); it does not import raysae. The cache is read
with numpy: ``manifest.json`` plus raw ``.npy`` shards [rows, d_in] (float32, float16, or
bfloat16 kept as uint16 bits), rows already shuffled within each shard. Batches come in
raysae's reading order for the same seed (shards permuted per epoch, windows of 4 shards cut
into 256-row blocks and permuted: raysae/activations/reader.py ``plan_segments``), so a
SAELens run and a raysae run with one seed see the same batches, one epoch at most.

Inputs are scaled by one factor s with mean ||s x||^2 = d_in (``--scale manifest``: from the
manifest's ``stats.mean_sq_norm``; ``first-batch``: from the first batch, raysae's own
default), set on SAELens's ActivationScaler (``normalize_activations =
"expected_average_only_in"``), which SAELens folds into the weights after ``fit`` (W_enc *= s,
W_dec /= s, b_dec /= s). The decoder norms are then folded with SAELens's ``fold_W_dec_norm``
(for TopK, after which ``rescale_acts_by_decoder_norm`` is a no-op and is turned off, as
SAELens's own whitening fold does), so the saved SAE reads raw cache activations and has
unit decoder rows. Everything else is SAELens's default (Adam, constant LR, gradient norm
clipped at 1, decoder rows at norm 0.1 with W_enc = W_dec^T, no L1 warm-up, TopK AuxK with
dead window 1000 steps, no wandb, no evaluator) except lr 1e-3 (SAELens's default is 3e-4;
raysae's budget uses 1e-3) and the input scale (SAELens's default is no normalisation).

    python train_saelens.py --cache DIR --out DIR --arch standard --l1 2.7 --seed 0
    python train_saelens.py --cache DIR --out DIR --arch topk --k 16 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
import numpy as np  # noqa: E402
import torch  # noqa: E402

BLOCK_ROWS, WINDOW_SHARDS = 256, 4  # raysae.activations.reader defaults


def read_cache(folder: Path) -> tuple[dict, list[np.ndarray]]:
    """(manifest, memory-mapped shard arrays in their storage dtype)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest["dtype"] not in ("float32", "float16", "bfloat16"):
        raise SystemExit(f"unsupported cache dtype {manifest['dtype']!r}")
    arrays = [np.load(folder / s["file"], mmap_mode="r") for s in manifest["shards"]]
    for s, a in zip(manifest["shards"], arrays):
        if a.shape != (s["rows"], manifest["d_in"]):
            raise SystemExit(f"shard {s['file']} has shape {a.shape}; the manifest disagrees")
    return manifest, arrays


def to_float32(rows: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # stored as the upper 16 bits of a float32
        return (rows.astype(np.uint32) << 16).view(np.float32)
    return rows.astype(np.float32)


def segments(shard_rows: list[int], seed: int) -> Iterator[tuple[int, int, int]]:
    """(shard, start, stop) row runs in raysae's reading order (``plan_segments``)."""
    rows = np.asarray(shard_rows, dtype=np.int64)
    epoch = 0
    while True:
        rng = np.random.default_rng([seed % 2**63, epoch])
        order = rng.permutation(len(rows))
        for w in range(0, len(order), WINDOW_SHARDS):
            shards = order[w : w + WINDOW_SHARDS]
            counts = -(-rows[shards] // BLOCK_ROWS)
            shard = np.repeat(shards, counts)
            start = (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
            start *= BLOCK_ROWS
            perm = rng.permutation(len(shard))
            stop = np.minimum(start + BLOCK_ROWS, rows[shard])
            yield from zip(shard[perm].tolist(), start[perm].tolist(), stop[perm].tolist())
        epoch += 1


def batches(arrays: list[np.ndarray], dtype: str, seed: int,
            batch_size: int) -> Iterator[torch.Tensor]:
    """Float32 batches [batch_size, d_in], without end (the trainer stops)."""
    runs, carry = segments([len(a) for a in arrays], seed), None
    while True:
        parts, left = [], batch_size
        while left:
            shard, start, stop = carry or next(runs)
            take = min(stop - start, left)
            parts.append(arrays[shard][start : start + take])
            left -= take
            carry = (shard, start + take, stop) if start + take < stop else None
        yield torch.from_numpy(to_float32(np.concatenate(parts), dtype))


def make_sae(args: argparse.Namespace, d_in: int, metadata: dict):
    """A fresh SAELens training SAE (its own init, seeded by torch's global RNG)."""
    from sae_lens import StandardTrainingSAE, TopKTrainingSAE
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    torch.manual_seed(args.seed)
    common = dict(d_in=d_in, d_sae=args.d_sae, device=args.device,
                  normalize_activations="expected_average_only_in",
                  metadata=SAEMetadata(**metadata))
    if args.arch == "standard":
        return StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=args.l1, **common))
    return TopKTrainingSAE(TopKTrainingSAEConfig(k=args.k, **common))


def fold_decoder_norms(sae) -> None:
    """Unit decoder rows on disk (features absorb the norms; outputs unchanged)."""
    sae.fold_W_dec_norm()
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        sae.cfg.rescale_acts_by_decoder_norm = False  # a no-op with unit rows


def check_same(before: torch.Tensor, after: torch.Tensor, what: str,
               max_frac: float = 0.0) -> None:
    """Outputs unchanged (relative error < 1e-4) on all but ``max_frac`` of the tokens
    (TopK: an exact tie at the k-th value may be broken the other way after a fold)."""
    err = (after - before).norm(dim=-1) / before.norm(dim=-1).clamp_min(1e-12)
    frac = (err > 1e-4).float().mean().item()
    if frac > max_frac:
        raise SystemExit(f"{what} changed the SAE's output on {frac:.2%} of the tokens")


def train(args: argparse.Namespace) -> dict:
    from sae_lens import SAE, SAETrainer, __version__
    from sae_lens.config import SAETrainerConfig

    manifest, arrays = read_cache(Path(args.cache))
    d_in, steps = int(manifest["d_in"]), args.tokens // args.batch_size
    data = batches(arrays, manifest["dtype"], args.seed, args.batch_size)
    first = next(data)
    mean_sq = (manifest["stats"]["mean_sq_norm"] if args.scale == "manifest"
               else first.pow(2).sum(dim=-1).mean().item())
    scale = math.sqrt(d_in / mean_sq)  # mean ||s x||^2 = d_in
    data = batches(arrays, manifest["dtype"], args.seed, args.batch_size)  # from the start
    sae = make_sae(args, d_in, {"model_name": manifest.get("model"),
                                "hook_name": manifest.get("hook"),
                                "context_size": manifest.get("context_length")})
    cfg = SAETrainerConfig(total_training_samples=steps * args.batch_size,
                           train_batch_size_samples=args.batch_size, lr=args.lr,
                           lr_end=args.lr / 10,  # the runner config's default (unused)
                           device=args.device)
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=data)
    trainer.activation_scaler.scaling_factor = scale  # folded by fit()
    start = time.perf_counter()
    sae = trainer.fit()
    seconds = time.perf_counter() - start
    info = {"arch": args.arch, "l1": args.l1, "k": args.k, "seed": args.seed,
            "steps": trainer.n_training_steps, "tokens": trainer.n_training_samples,
            "batch_size": args.batch_size, "lr": args.lr, "activation_scale": scale,
            "cache": str(args.cache), "cache_key": manifest.get("key"),
            "train_l0_last_window": sae.cfg.metadata.l0,
            "trained_rescale_acts_by_decoder_norm": getattr(
                sae.cfg, "rescale_acts_by_decoder_norm", None), "sae_lens": __version__,
            "torch": torch.__version__, "seconds": round(seconds, 1)}
    ties = 0.01 if args.arch == "topk" else 0.0
    with torch.no_grad():
        out = sae(first)
        fold_decoder_norms(sae)
        check_same(out, sae(first), "fold_W_dec_norm", ties)
        sae.cfg.metadata.saelens_parity = info  # saved in cfg.json's metadata
        sae.save_inference_model(args.out)
        check_same(out, SAE.load_from_disk(args.out)(first), "saving and loading", ties)
    return {"out": str(args.out), **info}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True, help="raysae activation cache folder")
    p.add_argument("--out", required=True, help="folder for cfg.json + sae_weights.safetensors")
    p.add_argument("--arch", choices=("standard", "topk"), required=True)
    p.add_argument("--l1", type=float, help="L1 coefficient (standard)")
    p.add_argument("--k", type=int, help="k (topk)")
    p.add_argument("--d-sae", type=int, default=512)
    p.add_argument("--tokens", type=int, default=500_000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", choices=("manifest", "first-batch"), default="manifest",
                   help="input scale from the manifest's mean ||x||^2 or the first batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if (args.arch == "standard") != (args.l1 is not None) or \
            (args.arch == "topk") != (args.k is not None):
        p.error("--arch standard needs --l1 (and no --k); --arch topk needs --k")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print("RESULT " + json.dumps(train(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
