"""CLI subcommands `build-model` (the local GPT-NeoX) and `cache` (an activation cache)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from raysae.activations.cache import build_cache, load_manifest, verify_cache
from raysae.activations.source import DTYPES, ActivationSource
from raysae.lm import corpus
from raysae.lm.local_model import LocalModelSpec, build_local_model, read_metadata
from raysae.lm.models import DEFAULT_HOOK, check_hook, load_model


def add_build_model_parser(subparsers) -> argparse.ArgumentParser:
    """`raysae build-model`: train (or find cached) the local model; print its metadata."""
    p = subparsers.add_parser("build-model", help="train the offline local GPT-NeoX model",
                              description=add_build_model_parser.__doc__)
    p.add_argument("--tiny", action="store_true", help="the seconds-to-build test model")
    p.add_argument("--source", nargs="+", default=None,
                   help="local text files/folders to train on (default: the stdlib's .py files)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: spec's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=build_model_command)
    return p


def build_model_command(args) -> int:
    spec = LocalModelSpec.tiny() if args.tiny else LocalModelSpec()
    if args.source:
        spec = replace(spec, source=tuple(args.source))
    if args.steps is not None:
        spec = replace(spec, train_steps=args.steps)
    path = build_local_model(spec, progress=not args.quiet)
    print(json.dumps({"path": str(path), **read_metadata(path)}, indent=1))
    return 0


def add_cache_parser(subparsers) -> argparse.ArgumentParser:
    """`raysae cache`: build (or find) an activation cache; print its manifest."""
    p = subparsers.add_parser("cache", help="harvest activations into a cache (.npy shards)",
                              description=add_cache_parser.__doc__)
    p.add_argument("--model", default="local",
                   help="hub name, checkpoint folder, 'local' (default) or 'local-tiny'")
    p.add_argument("--hook", default=DEFAULT_HOOK)
    p.add_argument("--dataset", default=corpus.STDLIB,
                   help="'stdlib', local text/parquet/json files, or a hub dataset name")
    p.add_argument("--split", default="train", choices=corpus.SPLITS)
    p.add_argument("--text-column", default="text")
    p.add_argument("--context-length", type=int, default=128)
    p.add_argument("--n-tokens", type=int, default=1_000_000)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--keep-bos", action="store_true", help="keep the BOS position's rows")
    p.add_argument("--batch-blocks", type=int, default=32, help="token blocks per forward")
    p.add_argument("--num-actors", type=int, default=None,
                   help="actor pool size (default: one per GPU, else one per CPU)")
    p.add_argument("--shard-rows", type=int, default=65_536,
                   help="rows per shard (.npy file, rows shuffled within it)")
    p.add_argument("--cache-root", default=None,
                   help="folder of caches (default: $RAYSAE_CACHE_DIR/activations)")
    p.add_argument("--verify", action="store_true",
                   help="re-check every file's checksum, each shard's rows, token ids and "
                   "finiteness")
    p.add_argument("--full", action="store_true", help="print the whole manifest")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=build_cache_command)
    return p


def build_cache_command(args) -> int:
    """Build the cache the arguments describe and print its path and manifest as JSON."""
    src = ActivationSource(
        model=args.model, hook=args.hook, dataset=args.dataset, split=args.split,
        text_column=args.text_column, context_length=args.context_length,
        n_tokens=args.n_tokens, dtype=args.dtype, drop_bos=not args.keep_bos,
        batch_blocks=args.batch_blocks, num_actors=args.num_actors, shard_rows=args.shard_rows,
    )
    _check_hook_early(src)
    path = build_cache(src, args.cache_root, progress=not args.quiet)
    manifest = verify_cache(path) if args.verify else load_manifest(path)
    if not args.full:
        manifest = {**manifest, "shards": len(manifest["shards"]),
                    "stats": {k: v for k, v in manifest["stats"].items() if k != "mean"}}
    print(json.dumps({"path": str(path), **manifest}, indent=1))
    return 0


def _check_hook_early(src) -> None:
    """Fail on a wrong hook name before Ray starts (a ValueError listing valid names)."""
    check_hook(load_model(src.model, device="cpu"), src.hook)
