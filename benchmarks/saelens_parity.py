"""Parity of raysae's SAEs with SAELens's own (issue #22): the same activation cache, budget,
batch order and input scale per seed, and evaluator.

SAELens (in its own venv: sae-lens pins transformer-lens 3.x, raysae needs 4.x; build it
with ``benchmarks/saelens_parity/make_venv.sh``) trains, through
``benchmarks/saelens_parity/train_saelens.py``, a StandardTrainingSAE per L1 coefficient
and a TopKTrainingSAE (k=16) per seed, with its own SAETrainer and defaults (lr 1e-3 as
raysae). raysae trains, per seed, an L0 ladder of relu L1 SAEs at ``--targets`` (the L0
controller) and a TopK SAE (k=16). Every SAE is loaded with raysae's ``SAE.load`` and
evaluated by raysae's evaluator on the same held-out blocks (held-out L0, FVU, spliced CE).

Printed: each SAE's numbers; then, per raysae L1 target, SAELens's L1 CE and FVU
interpolated (linear in log L0, between its coefficients' SAEs of the same seed) at raysae's
held-out L0, and the paired difference raysae minus SAELens (mean and seed sd); TopK is
compared at equal k. Written to ``--out``: saes.parquet, paired.parquet, summary.parquet
and the SAEs. The coefficients bracket L0 16 closely (2.2, 2.7, 3.3): CE bends with L0, and a
straight line across a wide gap overstates SAELens's CE there (by ~0.005 nats at L0 16).

    benchmarks/saelens_parity/make_venv.sh /work/sae_lens_venv   # once
    python benchmarks/saelens_parity.py [--seeds 0 1 2] [--l1 ...] [--recipe NAME] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from recipe_ablation import default_inputs  # noqa: E402  (the default job's cache and model)

TRAIN_SCRIPT = Path(__file__).parent / "saelens_parity" / "train_saelens.py"
METRICS = ("l0", "fvu", "ce_sae", "ce_clean", "ce_zero", "ce_recovered", "l2_ratio")


def saelens_env() -> dict[str, str]:
    """This environment without raysae's venv (the SAELens venv's python finds its own)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return {**env, "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}


def reusable(out: Path, args: argparse.Namespace) -> dict | None:
    """The record of an SAE already trained in ``out`` with this budget and width."""
    if not (out / "cfg.json").exists():
        return None
    cfg = json.loads((out / "cfg.json").read_text())
    info = cfg.get("metadata", {}).get("saelens_parity", {})
    same = (cfg.get("d_sae") == args.d_sae
            and info.get("tokens") == args.tokens // info.get("batch_size", 512) * 512)
    return {"out": str(out), **info} if same else None


def train_saelens(args: argparse.Namespace, cache: str, job: dict) -> dict:
    """Run train_saelens.py in the SAELens venv for one SAE; its RESULT line as a dict."""
    out = Path(args.out) / "saes" / job["name"]
    flags = ["--l1", str(job["l1"])] if job["arch"] == "standard" else ["--k", str(job["k"])]
    if args.reuse and (done := reusable(out, args)):
        return done
    cmd = [str(Path(args.saelens_venv) / "bin" / "python"), str(TRAIN_SCRIPT), "--cache", cache,
           "--out", str(out), "--arch", job["arch"], *flags, "--seed", str(job["seed"]),
           "--d-sae", str(args.d_sae), "--tokens", str(args.tokens), "--scale", args.scale]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=saelens_env())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"SAELens run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def saelens_jobs(args: argparse.Namespace) -> list[dict]:
    jobs = [{"impl": "saelens", "arch": "standard", "l1": c, "k": None, "seed": s,
             "name": f"saelens-l1-{c:g}-seed{s}"} for s in args.seeds for c in args.l1]
    jobs += [{"impl": "saelens", "arch": "topk", "l1": None, "k": args.k, "seed": s,
              "name": f"saelens-topk{args.k}-seed{s}"} for s in args.seeds]
    return jobs


def run_saelens(args: argparse.Namespace, cache: str) -> list[dict]:
    rows = []
    for job in saelens_jobs(args):
        start = time.perf_counter()
        result = train_saelens(args, cache, job)
        print(f"  {job['name']}: {time.perf_counter() - start:.0f} s", flush=True)
        rows.append({**job, "path": result["out"],
                     "activation_scale": result.get("activation_scale")})
    return rows


def raysae_config(args: argparse.Namespace, manifest: dict, seed: int, kind: str):
    """raysae's defaults, with the input scale SAELens gets (``--scale``)."""
    from raysae.core.config import PenaltyConfig, SAEConfig, TrainConfig

    d_in = int(manifest["d_in"])
    extra = {"recipe": args.recipe} if args.recipe else {}
    if args.scale == "manifest":  # else raysae's default: from the first batch
        extra["activation_scale"] = math.sqrt(d_in / manifest["stats"]["mean_sq_norm"])
    return TrainConfig(sae=SAEConfig(d_in, args.d_sae), penalty=PenaltyConfig.power(1.0),
                       kind=kind, total_tokens=args.tokens, seed=seed, **extra)


def train_raysae(args: argparse.Namespace, cache: str, manifest: dict, seed: int, kind: str,
                 targets: list[float]) -> list[dict]:
    """One raysae ladder (relu L1 with the controller, or topk at k = target); saved SAEs."""
    from raysae.activations.batches import iter_activation_batches
    from raysae.core.training import train_ladder

    cfg = raysae_config(args, manifest, seed, kind)
    batches = iter_activation_batches(cache, cfg.batch_size, n_tokens=cfg.total_tokens,
                                      seed=seed)
    rows = []
    for target, result in zip(targets, train_ladder(cfg, targets, batches)):
        label = f"l1-L0{target:g}" if kind == "relu" else f"topk{target:g}"
        name = f"raysae-{label}-seed{seed}"
        path = result.sae.save(Path(args.out) / "saes" / name,
                               raysae={"train_config": cfg.to_dict(), "target_l0": target,
                                       "status": result.status, "final_lambda": result.lam})
        rows.append({"impl": "raysae", "arch": "standard" if kind == "relu" else "topk",
                     "l1": None, "k": int(target) if kind == "topk" else None,
                     "target_l0": target if kind == "relu" else None, "seed": seed,
                     "name": name, "path": str(path), "recipe": cfg.recipe,
                     "train_status": result.status, "activation_scale": result.activation_scale})
    return rows


def run_raysae(args: argparse.Namespace, cache: str, manifest: dict) -> list[dict]:
    rows = []
    for seed in args.seeds:
        start = time.perf_counter()
        rows += train_raysae(args, cache, manifest, seed, "relu", list(args.targets))
        rows += train_raysae(args, cache, manifest, seed, "topk", [float(args.k)])
        print(f"  raysae seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def evaluate(rows: list[dict], model: str, hook: str, args: argparse.Namespace,
             context_length: int) -> pd.DataFrame:
    """Every SAE, loaded from its folder, on the same held-out blocks."""
    from raysae.core.sae import SAE
    from raysae.evaluation.spliced_ce import heldout_evaluator
    from raysae.lm.models import load_model

    evaluator = heldout_evaluator(load_model(model, device="cpu"), hook, n_blocks=args.blocks,
                                  context_length=context_length)
    out = []
    for row in rows:
        metrics = evaluator.evaluate(SAE.load(row["path"]))
        out.append({**row, **{k: metrics[k] for k in METRICS}})
    return pd.DataFrame(out)


def interpolate(points: pd.DataFrame, l0: float, column: str) -> float:
    """``column`` at ``l0``, linear in log L0 between the points; NaN outside their range."""
    pts = points.sort_values("l0")
    return float(np.interp(np.log(l0), np.log(pts.l0), pts[column], left=np.nan,
                           right=np.nan))


def paired(df: pd.DataFrame) -> pd.DataFrame:
    """Per comparison and seed: raysae's numbers, SAELens's at raysae's L0, the differences."""
    rows = []
    for _, r in df[df.impl == "raysae"].iterrows():
        ours = df[(df.impl == "saelens") & (df.seed == r.seed) & (df.arch == r.arch)]
        if r.arch == "topk":
            ref = ours[ours.k == r.k].iloc[0]
            ce, fvu, ref_l0, what = ref.ce_sae, ref.fvu, ref.l0, f"TopK k={r.k:g}"
        else:
            ce, fvu = interpolate(ours, r.l0, "ce_sae"), interpolate(ours, r.l0, "fvu")
            ref_l0, what = r.l0, f"L1 target L0 {r.target_l0:g}"
        rows.append({"comparison": what, "seed": r.seed, "raysae_l0": r.l0,
                     "saelens_l0": ref_l0, "raysae_fvu": r.fvu, "saelens_fvu": fvu,
                     "raysae_ce": r.ce_sae, "saelens_ce": ce, "d_fvu": r.fvu - fvu,
                     "d_ce": r.ce_sae - ce,
                     "saelens_l0_range": f"{ours.l0.min():.1f}-{ours.l0.max():.1f}"})
    return pd.DataFrame(rows)


def summary(pairs: pd.DataFrame) -> pd.DataFrame:
    """Means over seeds, and the seed sd of the paired differences."""
    return pairs.groupby("comparison", sort=False).agg(
        n=("seed", "count"), raysae_l0=("raysae_l0", "mean"), raysae_fvu=("raysae_fvu", "mean"),
        saelens_fvu=("saelens_fvu", "mean"), d_fvu=("d_fvu", "mean"), d_fvu_sd=("d_fvu", "std"),
        raysae_ce=("raysae_ce", "mean"), saelens_ce=("saelens_ce", "mean"),
        d_ce=("d_ce", "mean"), d_ce_sd=("d_ce", "std")).reset_index()


def show(title: str, df: pd.DataFrame) -> None:
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(f"\n{title}\n{df.to_string(index=False, float_format=lambda v: f'{v:.4g}')}")


def run(args: argparse.Namespace) -> pd.DataFrame:
    from raysae.activations.cache import load_manifest

    if args.cache:
        cache, model, hook = args.cache, args.model, args.hook
    else:
        cache, model, hook = default_inputs()
    manifest = load_manifest(cache)
    if not (Path(args.saelens_venv) / "bin" / "python").exists():
        raise SystemExit(f"no SAELens venv at {args.saelens_venv}; build it with "
                         f"benchmarks/saelens_parity/make_venv.sh {args.saelens_venv}")
    print(f"cache {cache}\nmodel {model} at {hook}\nSAELens ({args.saelens_venv}):", flush=True)
    rows = run_saelens(args, cache)
    print("raysae:", flush=True)
    rows += run_raysae(args, cache, manifest)
    print("evaluating", flush=True)
    return evaluate(rows, model, hook, args, int(manifest["context_length"]))


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", help="activation cache (default: the local default job's)")
    p.add_argument("--model", help="LM folder (with --cache)")
    p.add_argument("--hook", default="blocks.1.hook_resid_post", help="(with --cache)")
    p.add_argument("--saelens-venv", default="/work/sae_lens_venv")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--l1", type=float, nargs="+", default=[0.5, 0.8, 1.5, 2.2, 2.7, 3.3, 5.0],
                   help="SAELens L1 coefficients (their L0s should bracket --targets)")
    p.add_argument("--k", type=int, default=16, help="TopK k (both)")
    p.add_argument("--targets", type=float, nargs="+", default=[16.0, 64.0],
                   help="raysae's L1 ladder targets (held-out L0)")
    p.add_argument("--recipe", help="raysae's training recipe (default: raysae's default)")
    p.add_argument("--scale", choices=("first-batch", "manifest"), default="first-batch",
                   help="input scale of both (mean ||s x||^2 = d_in) from the first batch "
                   "(raysae's default) or the manifest's mean ||x||^2")
    p.add_argument("--tokens", type=int, default=500_000)
    p.add_argument("--d-sae", type=int, default=512)
    p.add_argument("--blocks", type=int, default=64, help="held-out blocks")
    p.add_argument("--reuse", action="store_true", help="keep SAELens SAEs already in --out")
    p.add_argument("--out", default="results/saelens_parity")
    args = p.parse_args(argv)
    if args.cache and not args.model:
        p.error("--cache needs --model (the LM the cache was harvested from)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    start = time.perf_counter()
    df = run(args)
    pairs = paired(df)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out / "saes.parquet", index=False)
    pairs.to_parquet(out / "paired.parquet", index=False)
    summary(pairs).to_parquet(out / "summary.parquet", index=False)
    show("SAEs (raysae evaluator, held-out blocks):",
         df[["name", "seed", "l0", "fvu", "ce_sae", "ce_recovered"]])
    show("Paired, per seed (SAELens L1 interpolated in log L0 at raysae's L0):", pairs)
    show("raysae minus SAELens (mean over seeds, seed sd):", summary(pairs))
    print(f"\nwritten to {out}; {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
