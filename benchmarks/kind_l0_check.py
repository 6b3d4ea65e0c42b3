"""Does a penalty-free SAE kind hit its target L0 on held-out text? One ladder per seed.

    python benchmarks/kind_l0_check.py --kind matryoshka [--seeds 0 1 2] [--targets 4 8 ...]

The local default job (its model, activation cache, budget and ladder, targets 4..128
unless ``--targets``), trained as ``--kind`` by a trial's own code path (its TrialSpec,
TrainConfig with ``{"kind": ...}``, cache reader, LadderTrainer and held-out evaluation,
without Ray), once per seed. Prints, per seed and target, the held-out L0 (measured on the
saved SAE, so with the inference threshold for BatchTopK kinds), its relative error
``L0 / target - 1`` and the held-out CE with the SAE spliced in, then how many SAEs land
within ``--tol`` (default 5%) of their target.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
from trial_work import local_spec, train_and_evaluate

from raysae.core.kinds import KINDS
from raysae.search.space import reference_configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", default="matryoshka", choices=sorted(KINDS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", type=float, nargs="+", default=None,
                        help="target L0s (default: the local job's ladder)")
    parser.add_argument("--tol", type=float, default=0.05)
    parser.add_argument("--out", default=None, help="also write the rows as Parquet here")
    args = parser.parse_args()
    spec = local_spec(**({"targets": tuple(args.targets)} if args.targets else {}))
    rows = []
    for seed in args.seeds:
        start = time.perf_counter()
        config = {**reference_configs()[0], "kind": args.kind, "seed": seed}
        for m in train_and_evaluate(spec, config):
            rows.append({"kind": args.kind, "seed": seed, "target_l0": m["target_l0"],
                         "l0": m["l0"], "rel_err": m["l0"] / m["target_l0"] - 1,
                         "ce_sae": m["ce_sae"]})
            print(f"seed {seed} target {m['target_l0']:g}: L0 {m['l0']:.3f} "
                  f"({rows[-1]['rel_err']:+.2%}), CE {m['ce_sae']:.4f}", flush=True)
        print(f"seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    df = pd.DataFrame(rows)
    with pd.option_context("display.float_format", "{:.4f}".format):
        print(df.to_string(index=False))
    within = int((df["rel_err"].abs() <= args.tol).sum())
    print(f"{args.kind}: {within} of {len(df)} within {args.tol:.0%} of target; "
          f"mean |rel_err| {df['rel_err'].abs().mean():.2%}, worst {df['rel_err'].abs().max():.2%}")
    if args.out:
        df.to_parquet(args.out)


if __name__ == "__main__":
    main()
