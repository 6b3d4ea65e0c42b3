"""Which proposal search fits the local default's budget? TPE, GP and a quasi-random start on
the same budget and seeds, against today's 3-proposal default (issue #28).

One job of the local default (model, cache, Ray and plan exactly as ``raysae search`` builds
them), with its stages replaced by this comparison:

1. L1 at seed 0 (the search objective's reference CE, as in the default job);
2. one proposal search per arm (``stages.propose``: the search stage and, under successive
   halving, its promotion), each on seed 0 with the same sampler seed: ``tpe3`` (the
   default before issue #28: TPE, 3 proposals, no rung), ``tpe12`` / ``gp12`` / ``qmc12``
   (12 proposals, rung 1/16, the 2 best there promoted: today's policy) and ``tpe12asha``
   (12, rung 1/16, Ray Tune's ASHA deciding);
3. each arm's best proposal (by the search objective on seed 0, as the job chooses it)
   retrained with fresh seeds 1..S (``--fresh``), L1 beside them.

Prints, per arm: the proposals' wall time (search and promotion stages; a ratio to
``tpe3``'s, measured in the same run; meaningful only on a quiet machine), proposals
stopped / finished, the chosen proposal,
its seed-0 objective (the selection replicate: biased, not a claim), and on the fresh seeds
its objective minus ``tpe3``'s best's, paired by seed, with a t 95% interval. Writes
``sampler_comparison.parquet`` (one row per arm) and ``fresh_seeds.parquet`` next to the job's
trials table.

    python benchmarks/sampler_comparison.py --storage /tmp/samplers
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

ARMS = {"tpe3": ("tpe", 3, 0.0, 0), "tpe12": ("tpe", 12, 1 / 16, 2),
        "gp12": ("gp", 12, 1 / 16, 2), "qmc12": ("qmc", 12, 1 / 16, 2),
        "tpe12asha": ("tpe", 12, 1 / 16, 0)}
"""arm -> (sampler, proposals, rung, promote)."""


def per_trial(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop_duplicates("tune_trial_id")


def compare(plan, results: Path, fresh: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The three steps of the module docstring; returns (one row per arm, every trial)."""
    from raysae.results.vocabulary import Stage
    from raysae.search import stages
    from raysae.search.trials_table import clean_trials
    from raysae.search.tune_setup import reference_grid

    fetch = results / "fetched"
    l1 = [c for c in reference_grid(plan) if "kind" not in c][:1]
    refs = stages.fit_stage(plan, Stage.REFS, plan.spec, tuple(l1), 0, False, fetch)
    spec = dataclasses.replace(plan.spec, reference_ce=stages.reference_ce(
        refs, plan.search.targets))
    rows, best, every = [], {}, [refs]
    for arm, (sampler, n, rung, promote) in ARMS.items():
        search = dataclasses.replace(plan.search, sampler=sampler, num_trials=n, rung=rung,
                                     promote=promote)
        arm_plan = dataclasses.replace(plan, name=f"{plan.name}-{arm}", search=search)
        start = time.perf_counter()
        frames, chosen_from = stages.propose(arm_plan, spec, False, fetch)
        every.extend(frames)
        seconds = time.perf_counter() - start
        trials = per_trial(pd.concat(frames, ignore_index=True))
        best[arm] = stages.best_configs(arm_plan, chosen_from, 1)[0]
        chosen = per_trial(chosen_from).nsmallest(1, "trial_objective").iloc[0]
        rows.append({"arm": arm, "sampler": sampler, "proposals": n, "rung": rung,
                     "promote": promote, "search_seconds": seconds,
                     "stopped": int((trials["status"] == "stopped").sum()),
                     "finished": int((trials["status"] == "finished").sum()),
                     "best": str(best[arm]), "seed0_objective": chosen["trial_objective"]})
    grid = tuple({**c, "seed": s, "arm": arm} for s in range(1, fresh + 1)
                 for arm, c in [("L1", l1[0]), *best.items()])
    confirm = stages.fit_stage(plan, Stage.CONFIRM, spec,
                               tuple({k: v for k, v in c.items() if k != "arm"} for c in grid),
                               2, False, fetch)
    confirmed = per_trial(confirm)
    out = pd.DataFrame(rows)
    fresh_table = fresh_scores(confirmed, best, l1[0], fresh)
    out = out.merge(paired(fresh_table, "tpe3"), on="arm", how="left")
    fresh_table.to_parquet(results / "fresh_seeds.parquet")
    return out, clean_trials(pd.concat([*every, confirm], ignore_index=True))


def fresh_scores(confirmed: pd.DataFrame, best: dict, l1: dict, fresh: int) -> pd.DataFrame:
    """Seed x arm -> the trial objective of that arm's best proposal (L1 as an arm), found
    among the confirmation's trials by penalty and parameters."""
    from raysae.search.space import penalty_of

    out = []
    for arm, config in {"L1": l1, **best}.items():
        name, params = penalty_of(config)
        hit = confirmed[confirmed["penalty"] == name]
        for key, value in params.items():
            hit = hit[np.isclose(hit[key].astype(float), value)]
        out += [{"arm": arm, "seed": int(r["seed"]), "objective": float(r["trial_objective"])}
                for _, r in hit.iterrows() if 1 <= int(r["seed"]) <= fresh]
    table = pd.DataFrame(out).drop_duplicates(["arm", "seed"])
    return table.pivot(index="seed", columns="arm", values="objective")


def paired(table: pd.DataFrame, base: str) -> pd.DataFrame:
    """Per arm: mean fresh-seed objective and its difference from ``base``'s, paired by
    seed, with a t 95% interval (n = seeds both have)."""
    rows = []
    for arm in table.columns:
        both = table[[arm, base]].dropna()
        d = (both[arm] - both[base]).to_numpy()
        n = len(d)
        half = (stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / np.sqrt(n)) if n > 1 else np.nan
        rows.append({"arm": arm, "fresh_mean": float(table[arm].mean()),
                     f"minus_{base}": float(d.mean()) if n else np.nan,
                     "ci_low": float(d.mean() - half) if n > 1 else np.nan,
                     "ci_high": float(d.mean() + half) if n > 1 else np.nan, "n_seeds": n})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", type=Path, default=Path("sampler_comparison"))
    parser.add_argument("--fresh", type=int, default=3, help="fresh seeds 1..N")
    args = parser.parse_args()
    from raysae.search import job
    from raysae.search.config import job_config

    def run_search(plan, results, resume=False, settings=None):
        results = Path(results)
        results.mkdir(parents=True, exist_ok=True)
        table, trials = compare(plan, results, args.fresh)
        with pd.option_context("display.width", 200, "display.max_colwidth", 90):
            print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        base = table.set_index("arm")["search_seconds"]["tpe3"]
        for arm, s in table.set_index("arm")["search_seconds"].items():
            print(f"{arm}: search stage {s:.1f} s = {s / base:.2f}x tpe3")
        table.to_parquet(results / "sampler_comparison.parquet")
        from raysae.core.metrics import metric_names
        from raysae.results import contract

        # every trial it ran, as the job writes them
        contract.write_trials(trials, results, metric_names())
        return results

    job.run_search = run_search
    cfg = job_config("local", storage=str(args.storage.resolve() / "tune"),
                     results=str(args.storage.resolve() / "analysis"), name="samplers",
                     baselines=("topk",), report=False)
    job.run(cfg)


if __name__ == "__main__":
    main()
