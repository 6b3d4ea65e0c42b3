"""Does bf16 autocast cost CE? Paired seeds of one ladder, trained in fp32 and in bf16 autocast.

    python benchmarks/precision_quality.py [--seeds 0 1 2 3] [--targets 16 64] [--label sqrt]

The local default job (its model, cache, budget and recipe), one reference penalty's ladder
at ``--targets``, every step dense so that the bf16 run is bf16 throughout, trained by a
trial's own code path (its TrialSpec, TrainConfig, cache
reader, LadderTrainer and held-out evaluation, without Ray) once with
``autocast_bf16 = "off"`` and once with ``"on"`` for each seed: the same initialisation and
data order, so the difference of each pair is the precision's alone. Prints held-out CE and
L0 of every SAE and, per target, the mean paired difference bf16 - fp32 with its 95%
t-interval, beside the seed-to-seed spread of fp32 CE (the noise a claim must beat). On a CPU
the arithmetic is the CPU's bf16 (``torch.autocast("cpu")``), which rounds as a GPU's does.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from record import FINDINGS, write_record
from scipy import stats
from trial_work import local_spec, train_and_evaluate

from raysae.search.space import reference_configs, reference_points


def with_precision(spec, bf16: str):
    """The spec whose trials train with ``autocast_bf16 = bf16``, every step dense
    (``sparse_step off``): on a CPU, "auto" would switch to the relu sparse step, which runs
    outside autocast, after the first logging step, and most of a "bf16" run would be fp32."""
    return dataclasses.replace(spec, train=dataclasses.replace(
        spec.train, autocast_bf16=bf16, sparse_step="off"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--targets", type=float, nargs="+", default=[16.0, 64.0])
    parser.add_argument("--label", default="sqrt", help="a reference point's label")
    parser.add_argument("--json", type=Path, default=FINDINGS / "precision_quality.json",
                        help="where the record goes (default: the committed findings)")
    args = parser.parse_args()
    points = dict(zip([label for label, _, _ in reference_points()], reference_configs(),
                      strict=True))
    if args.label not in points:
        parser.error(f"--label {args.label!r}: one of {sorted(points)}")
    point = points[args.label]
    spec = local_spec(targets=tuple(args.targets))
    load, rows, summary = os.getloadavg()[0], [], []
    for seed in args.seeds:
        for bf16 in ("off", "on"):
            start = time.perf_counter()
            for m in train_and_evaluate(with_precision(spec, bf16), {**point, "seed": seed}):
                rows.append({"seed": seed, "precision": "bf16" if bf16 == "on" else "fp32",
                             "target_l0": m["target_l0"], "l0": m["l0"], "ce_sae": m["ce_sae"],
                             "seconds": time.perf_counter() - start})
            print(f"seed {seed} {bf16=}: {time.perf_counter() - start:.0f} s", flush=True)
    df = pd.DataFrame(rows)
    print(df.to_string(index=False))
    wide = df.pivot_table(index=["target_l0", "seed"], columns="precision",
                          values=["ce_sae", "l0"])
    for target, part in wide.groupby(level=0):
        d = (part[("ce_sae", "bf16")] - part[("ce_sae", "fp32")]).to_numpy()
        n = len(d)
        half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / np.sqrt(n) if n > 1 else np.nan
        spread = part[("ce_sae", "fp32")].std(ddof=1)
        dl0 = (part[("l0", "bf16")] / part[("l0", "fp32")] - 1).mean()
        summary.append({"target_l0": float(target), "n_seeds": n,
                        "delta_ce_mean": float(d.mean()), "ci_low": float(d.mean() - half),
                        "ci_high": float(d.mean() + half), "fp32_seed_sd": float(spread),
                        "l0_ratio_minus_1": float(dl0)})
        print(f"L0 target {target:g}: CE bf16 - fp32 = {d.mean():+.4f} "
              f"[{d.mean() - half:+.4f}, {d.mean() + half:+.4f}] (n={n}); fp32 seed sd "
              f"{spread:.4f}; L0 bf16/fp32 - 1 = {dl0:+.3%}")
    write_record(args.json, {"label": args.label, "summary": summary,
                             "rows": df.to_dict("records")}, load)


if __name__ == "__main__":
    main()
