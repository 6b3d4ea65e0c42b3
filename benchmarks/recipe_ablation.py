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

import numpy as np
import pandas as pd
import torch

from raysae.core.config import PenaltyConfig, SAEConfig, TrainConfig
from raysae.core.ladder import LadderTrainer
from raysae.core.recipes import RECIPES, get_recipe, register_recipe
from raysae.core.training import train_ladder

L1, SQRT = PenaltyConfig.power(1.0), PenaltyConfig.power(0.5)


def _variant_recipes() -> None:
    """Register the one-factor recipes (in every worker process too)."""
    study, free, saelens = get_recipe("study"), get_recipe("free_norm"), get_recipe("saelens")
    for recipe in (
        dataclasses.replace(study, name="study+clip", grad_clip=1.0),
        dataclasses.replace(study, name="study+init0.1", decoder_init_norm=0.1),
        dataclasses.replace(saelens, name="saelens-clip", grad_clip=None),
        dataclasses.replace(free, name="free_norm-clip", grad_clip=None),
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
    "study +clip +constant LR": ("study +clip", L1, "study+clip", {"lr_decay_frac": 0.0}),
    "saelens": ("study", L1, "saelens", {}),
    "saelens -clip": ("saelens", L1, "saelens-clip", {}),
    "free_norm": ("study +clip", L1, "free_norm", {}),
    "free_norm vs saelens": ("saelens", L1, "free_norm", {}),
    "free_norm -clip": ("free_norm", L1, "free_norm-clip", {}),
    "free_norm +constant LR": ("free_norm", L1, "free_norm", {"lr_decay_frac": 0.0}),
    "free_norm, controller to the end": ("free_norm", L1, "free_norm", {"control_frac": 1.0}),
    "sqrt study": (None, SQRT, "study", {}),
    "sqrt study +clip": ("sqrt study", SQRT, "study+clip", {}),
    "sqrt free_norm": ("sqrt study +clip", SQRT, "free_norm", {}),
    "sqrt free_norm, outside weighting": ("sqrt free_norm", SQRT, "free_norm+outside", {}),
    # fixed lambda: each seed's lambdas are its baseline's controller's final ones, times
    # FIXED_MULTIPLIERS, and CE is interpolated at the controller's own held-out L0
    "free_norm fixed lambda": ("free_norm", L1, "free_norm", {"control_frac": 0.0}),
}
FIXED_MULTIPLIERS = (0.7, 1.0, 1.4)


def _fixed(variant: str) -> bool:
    return VARIANTS[variant][3].get("control_frac") == 0.0


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
    trainer = LadderTrainer(cfg, job["targets"], lams=lams)
    batches = iter_activation_batches(job["cache"], cfg.batch_size, n_tokens=cfg.total_tokens,
                                      seed=job["seed"])
    results = train_ladder(cfg, job["targets"], batches, trainer=trainer)
    mults = FIXED_MULTIPLIERS * len(results) if lams else [1.0] * len(results)
    return [{"variant": job["variant"], "seed": job["seed"], "target_l0": t, "lam": r.lam,
             "lam_multiplier": m,
             "train_status": r.status, "sae": r.sae}
            for t, m, r in zip(job["targets"], mults, results)]


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
    names = [v for v in args.variants if not _fixed(v)]
    jobs = [{**base, "variant": v, "seed": s} for v in names for s in args.seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        trained = [row for rows in pool.map(train_one, jobs) for row in rows]
        fixed = []
        for variant in (v for v in args.variants if _fixed(v)):  # needs its baseline's run
            ref = VARIANTS[variant][0]
            for s in args.seeds:
                lams = [r["lam"] for r in trained if r["variant"] == ref and r["seed"] == s]
                fixed.append({**base, "variant": variant, "seed": s,
                              "targets": [t for t in args.targets for _ in FIXED_MULTIPLIERS],
                              "lams": [lam * m for lam in lams for m in FIXED_MULTIPLIERS]})
        trained += [row for rows in pool.map(train_one, fixed) for row in rows]
    return evaluate(trained, model, hook, args.blocks)


def paired_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, target): means, seed sds and the paired CE difference to the baseline."""
    rows = []
    for (variant, target), group in df.groupby(["variant", "target_l0"], sort=False):
        if _fixed(variant):
            continue
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


def controller_check(df: pd.DataFrame) -> pd.DataFrame:
    """Controller minus fixed lambda at the controller's own held-out L0, per seed: the
    fixed-lambda CE interpolated linearly in log L0 between its lambdas' SAEs."""
    rows = []
    for variant in (v for v in VARIANTS if _fixed(v) and v in set(df.variant)):
        ctrl = df[df.variant == VARIANTS[variant][0]]
        for (target, seed), fixed in df[df.variant == variant].groupby(["target_l0", "seed"]):
            own = ctrl[(ctrl.target_l0 == target) & (ctrl.seed == seed)].iloc[0]
            pts = fixed.sort_values("l0")
            at = np.interp(np.log(own.l0), np.log(pts.l0), pts.ce_sae, left=np.nan,
                           right=np.nan)
            rows.append({"variant": variant, "target": target, "seed": seed,
                         "controller_l0": own.l0, "fixed_l0_range":
                         f"{pts.l0.min():.1f}-{pts.l0.max():.1f}",
                         "d_ce": own.ce_sae - at})
    out = pd.DataFrame(rows)
    return out.groupby(["variant", "target"]).agg(
        controller_l0=("controller_l0", "mean"), d_ce=("d_ce", "mean"),
        d_ce_sd=("d_ce", "std"), n=("d_ce", "count")).reset_index() if rows else out


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
    missing = {VARIANTS[v][0] for v in args.variants if _fixed(v)} - set(args.variants)
    if missing:
        parser.error(f"fixed-lambda variants need their baseline too: add {sorted(missing)}")
    df = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(args.out)
    table = paired_table(df)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        check = controller_check(df)
        if len(check):
            print("\ncontroller minus fixed lambda at the controller's held-out L0 (nats):")
            print(check.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
