"""Which part of the training recipe makes a penalty SAE good: one-factor ablations on the
local default's activation cache, paired seeds, evaluated like a search's trials.

Every variant trains one L0 ladder per seed (targets 16 and 64 by default, the L0
controller driving each member's lambda, 500k tokens, batch 512, Adam lr 1e-3, d_sae 512:
the default job's budget) on the same activation order per seed, and every SAE is evaluated
by raysae's evaluator on the same held-out blocks (held-out L0, FVU, spliced CE). Variants
change one factor of the study's recipe, or remove one from the free-norm recipe
(raysae.core.recipes):

- decoder: unit-norm rows (study) vs free norms with the penalty on f_i ||d_i||;
- decoder rows' initial norm (1.0 vs 0.1; the encoder starts as the decoder's transpose);
- gradient-norm clipping at 1.0;
- learning rate constant vs decayed linearly over the last 20%;
- sqrt's penalty weighting: rho(f_i ||d_i||) ('inside') vs ||d_i|| rho(f_i) ('outside');
- the controller vs a fixed lambda (each seed's controller's final lambda, fixed from
  step 0 with the usual 5% warm-up): does the controller handicap at equal L0?

Printed: per target, each variant's mean held-out L0, FVU and CE with their seed standard
deviations, and the paired CE difference to its baseline (mean and seed sd). Also written
to ``--out`` as Parquet.

    python benchmarks/recipe_ablation.py [--seeds 0 1 2] [--targets 16 64] [--jobs 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import torch

from raysae.core.config import PenaltyConfig, SAEConfig, TrainConfig
from raysae.core.ensemble import EnsembleTrainer, train_ensemble
from raysae.core.recipes import RECIPES, get_recipe, register_recipe

L1, SQRT = PenaltyConfig.power(1.0), PenaltyConfig.power(0.5)


def _variant_recipes() -> None:
    """Register the one-factor recipes (in every worker process too)."""
    study, free = get_recipe("study"), get_recipe("free_norm")
    for recipe in (
        dataclasses.replace(study, name="study+clip", grad_clip=1.0),
        dataclasses.replace(study, name="study+init0.1", decoder_init_norm=0.1),
        dataclasses.replace(free, name="free_norm-clip", grad_clip=None),
        dataclasses.replace(free, name="free_norm+init1", decoder_init_norm=1.0),
        dataclasses.replace(free, name="free_norm+outside", penalty_weighting="outside"),
    ):
        if recipe.name not in RECIPES:
            register_recipe(recipe)


# name -> (baseline name, penalty, recipe, TrainConfig overrides)
VARIANTS: dict[str, tuple[str | None, PenaltyConfig, str, dict]] = {
    "study": (None, L1, "study", {}),
    "study +clip": ("study", L1, "study+clip", {}),
    "study +init 0.1": ("study", L1, "study+init0.1", {}),
    "study +constant LR": ("study", L1, "study", {"lr_decay_frac": 0.0}),
    "free_norm": ("study", L1, "free_norm", {}),
    "free_norm -clip": ("free_norm", L1, "free_norm-clip", {}),
    "free_norm init 1.0": ("free_norm", L1, "free_norm+init1", {}),
    "free_norm +constant LR": ("free_norm", L1, "free_norm", {"lr_decay_frac": 0.0}),
    "free_norm fixed lambda": ("free_norm", L1, "free_norm", {"control_frac": 0.0}),
    "sqrt study": (None, SQRT, "study", {}),
    "sqrt free_norm (inside)": ("sqrt study", SQRT, "free_norm", {}),
    "sqrt free_norm (outside)": ("sqrt free_norm (inside)", SQRT, "free_norm+outside", {}),
}


def default_inputs() -> tuple[str, str, str]:
    """(cache folder, model folder, hook) of the local default job (built if missing)."""
    from raysae.lm.local_model import default_model
    from raysae.search.config import job_config
    from raysae.search.job import prepare_activations

    model = str(default_model())
    cache, _ = prepare_activations(job_config("local"), model, on_cluster=False)
    return cache, model, job_config("local").model.hook


def train_one(job: dict) -> list[dict]:
    """Train one variant's ladder for one seed; evaluate every member (worker process)."""
    torch.set_num_threads(1)
    _variant_recipes()
    from raysae.activations.batches import iter_activation_batches
    from raysae.activations.cache import load_manifest

    d_in = int(load_manifest(job["cache"])["d_in"])
    _, penalty, recipe, overrides = VARIANTS[job["variant"]]
    cfg = TrainConfig(sae=SAEConfig(d_in, job["d_sae"]), penalty=penalty, recipe=recipe,
                      total_tokens=job["tokens"], seed=job["seed"], **overrides)
    lams = job.get("lams")
    trainer = EnsembleTrainer(cfg, job["targets"], lams=lams)
    batches = iter_activation_batches(job["cache"], cfg.batch_size, n_tokens=cfg.total_tokens,
                                      seed=job["seed"])
    results = train_ensemble(cfg, job["targets"], batches, trainer=trainer)
    return [{"variant": job["variant"], "seed": job["seed"], "target_l0": t, "lam": r.lam,
             "train_status": r.status, "sae": r.sae} for t, r in zip(job["targets"], results)]


def evaluate(rows: list[dict], model: str, hook: str, blocks: int) -> pd.DataFrame:
    from raysae.evaluation.spliced_ce import heldout_evaluator
    from raysae.lm.models import load_model

    evaluator = heldout_evaluator(load_model(model, device="cpu"), hook, n_blocks=blocks)
    out = []
    for row in rows:
        metrics = evaluator.evaluate(row.pop("sae"))
        out.append({**row, **{k: metrics[k] for k in ("l0", "fvu", "ce_sae", "l2_ratio")}})
    return pd.DataFrame(out)


def run(args: argparse.Namespace) -> pd.DataFrame:
    cache, model, hook = (args.cache, args.model, args.hook) if args.cache else default_inputs()
    base = {"cache": cache, "d_sae": args.d_sae, "tokens": args.tokens,
            "targets": list(args.targets)}
    names = [v for v in VARIANTS if v != "free_norm fixed lambda" and v in args.variants]
    jobs = [{**base, "variant": v, "seed": s} for v in names for s in args.seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        trained = [row for rows in pool.map(train_one, jobs) for row in rows]
        if "free_norm fixed lambda" in args.variants:  # the controller's own final lambdas
            lams = {s: [r["lam"] for r in trained if r["variant"] == "free_norm"
                        and r["seed"] == s] for s in args.seeds}
            fixed = [{**base, "variant": "free_norm fixed lambda", "seed": s, "lams": lams[s]}
                     for s in args.seeds]
            trained += [row for rows in pool.map(train_one, fixed) for row in rows]
    return evaluate(trained, model, hook, args.blocks)


def paired_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, target): means, seed sds and the paired CE difference to the baseline."""
    rows = []
    for (variant, target), group in df.groupby(["variant", "target_l0"], sort=False):
        baseline = VARIANTS[variant][0]
        row = {"variant": variant, "target": target, "l0": group.l0.mean(),
               "fvu": group.fvu.mean(), "fvu_sd": group.fvu.std(), "ce": group.ce_sae.mean(),
               "ce_sd": group.ce_sae.std(), "vs": baseline or "", "d_ce": float("nan"),
               "d_ce_sd": float("nan")}
        if baseline is not None and baseline in set(df.variant):
            ref = df[(df.variant == baseline) & (df.target_l0 == target)].set_index("seed")
            diff = group.set_index("seed").ce_sae - ref.ce_sae
            row.update(d_ce=diff.mean(), d_ce_sd=diff.std())
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", type=float, nargs="+", default=[16.0, 64.0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--tokens", type=int, default=500_000)
    parser.add_argument("--d-sae", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=64, help="held-out blocks")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--cache", help="activation cache (default: the local default job's)")
    parser.add_argument("--model", help="LM folder (with --cache)")
    parser.add_argument("--hook", default="blocks.1.hook_resid_post", help="(with --cache)")
    parser.add_argument("--out", default="results/recipe_ablation.parquet")
    args = parser.parse_args(argv)
    df = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(args.out)
    table = paired_table(df)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
