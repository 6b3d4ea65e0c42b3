"""`raysae ablation SAE_DIR`: the study's four low-activation removal methods on a trained SAE.

Writes into ``--out`` (default ``SAE_DIR/ablation``): ``ablations.parquet`` (method,
parameter, l0, mse, fvu, ce_sae, ce_recovered, cos_sim, l2_ratio), the two figures
``removal_strength.png`` and ``methods_ce_vs_l0.png``, the feature statistics as Parquet
and ``summary.json`` (the unablated evaluation). The model and hook default to the ones
named in the SAE's cfg.json metadata (``model_name``, ``hook_name``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from raysae import io
from raysae.settings import UserError

STDLIB = "stdlib"  # raysae.lm.corpus.STDLIB; heavy modules load only when the command runs
DEFAULT_HOOK = "blocks.3.hook_resid_post"  # raysae.lm.models.DEFAULT_HOOK
FEATURE_TOKENS = 100_000  # raysae.evaluation.feature_stats.DEFAULT_TOKENS


def add_ablation_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ablation options (shared by the CLI subcommand and searches/threshold_ablation.py)."""
    parser.add_argument("sae", help="trained SAE directory (raysae or SAELens layout)")
    parser.add_argument("--model", help="hub name or local checkpoint folder "
                        "(default: the SAE's metadata model_name, else Pythia-70M-deduped)")
    parser.add_argument("--hook", help="hook name (default: the SAE's metadata hook_name, "
                        f"else {DEFAULT_HOOK})")
    parser.add_argument("--out", help="output folder (default: SAE_DIR/ablation)")
    parser.add_argument("--source", default=STDLIB,
                        help="held-out text: 'stdlib', local files or a hub dataset")
    parser.add_argument("--n-blocks", type=int, default=64, help="held-out token blocks")
    parser.add_argument("--context-length", type=int, default=None,
                        help="tokens per block (default: min(128, the model's context))")
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per forward")
    parser.add_argument("--n-points", type=int, default=10, help="grid points per method")
    parser.add_argument("--methods", nargs="+", default=None, help="subset of lowest_k "
                        "percent_of_max quantile global_threshold (default: all four)")
    parser.add_argument("--feature-tokens", type=int, default=FEATURE_TOKENS,
                        help="tokens for feature statistics (at most the held-out set)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if any)")
    return parser


def add_ablation_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``ablation`` subcommand."""
    parser = subparsers.add_parser("ablation", help="remove the lowest SAE activations four "
                                   "ways; table + figures", description=__doc__.split("\n")[0])
    add_ablation_arguments(parser)
    parser.set_defaults(func=ablation_command)
    return parser


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')}={value} must be >= 1")


def run_threshold_ablation(sae_dir, model: str | None = None, hook: str | None = None,
                           out_dir=None, *, source=STDLIB, n_blocks: int = 64,
                           context_length: int | None = None, batch_size: int = 8,
                           n_points: int = 10, methods=None, feature_tokens: int = FEATURE_TOKENS,
                           device: str | None = None) -> dict:
    """Evaluate the SAE, sweep every method, write table, figures and statistics."""
    # on use: the ablation's stack (the LM, matplotlib) loads when it runs, not for every command
    from raysae.analysis import ablation_plots
    from raysae.core.sae import SAE, read_sae_config
    from raysae.evaluation import feature_stats
    from raysae.evaluation.ablation import METHODS, ablation_sweep, calibrate
    from raysae.evaluation.spliced_ce import evaluate_sae, heldout_evaluator
    from raysae.lm.models import DEFAULT_MODEL, load_model

    _check_positive(n_blocks=n_blocks, batch_size=batch_size, feature_tokens=feature_tokens,
                    context_length=context_length)
    meta = read_sae_config(sae_dir).get("metadata") or {}
    sae = SAE.load(sae_dir)
    lm = load_model(model or meta.get("model_name") or DEFAULT_MODEL, device=device)
    sae = sae.to(next(lm.parameters()).device)
    hook = hook or meta.get("hook_name") or DEFAULT_HOOK
    ctx = context_length or min(128, int(lm.cfg.n_ctx))
    evaluator = heldout_evaluator(lm, hook, n_blocks, ctx, source, batch_size)
    summary = evaluate_sae(evaluator, sae, feature_tokens)
    table = ablation_sweep(evaluator, sae, methods or METHODS, n_points,
                           calibrate(evaluator, sae))
    out = Path(out_dir) if out_dir else Path(sae_dir) / "ablation"
    paths = {"table": io.write_parquet(table, out / "ablations.parquet")}
    paths.update(feature_stats.save_feature_statistics(
        out, *feature_stats.feature_statistics(evaluator, sae, feature_tokens)))
    paths["removal_strength"] = ablation_plots.removal_strength(
        table, out / "removal_strength.png", evaluator.ce_clean)
    paths["methods_ce_vs_l0"] = ablation_plots.methods_ce_vs_l0(
        table, out / "methods_ce_vs_l0.png", evaluator.ce_clean)
    summary.update(hook=hook, n_tokens=evaluator.n_tokens, context_length=ctx,
                   resumed_after_hook=evaluator.resumes)
    paths["summary"] = io.write_json(out / "summary.json", summary)
    return {"table": table, "summary": summary, "paths": paths}


def ablation_command(args: argparse.Namespace) -> int:
    """CLI entry: run the ablation and print the table and where the files went."""
    result = run_threshold_ablation(
        args.sae, args.model, args.hook, args.out, source=args.source, n_blocks=args.n_blocks,
        context_length=args.context_length, batch_size=args.batch_size,
        n_points=args.n_points, methods=args.methods, feature_tokens=args.feature_tokens,
        device=args.device)
    s = result["summary"]
    print(f"ce_clean {s['ce_clean']:.4f}  ce_sae {s['ce_sae']:.4f}  ce_zero {s['ce_zero']:.4f}"
          f"  recovered {s['ce_recovered']:.3f}  L0 {s['l0']:.1f}")
    print(result["table"].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for name, path in result["paths"].items():
        print(f"{name}: {path}")
    return 0
