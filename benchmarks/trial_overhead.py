"""A trial's training tokens/s under Ray Tune against the same trainer alone (issue #38).

The local default job's trial (its model, activation cache, ladder 4 .. 128, 500k tokens; the
sqrt reference, seed 0) trained three ways, alternated over ``--rounds``:

- alone: ``train_ladder`` on the trial's own batch stream, no Ray (benchmarks/trial_work.py),
  with the trial's torch threads;
- under Tune, reporting by wall time (the default ``--report-seconds 15``);
- under Tune, reporting at every logging step (``--report-seconds 0``: a function trainable
  reports synchronously, so each report waits for the driver).

Tune's rows give ``train_tokens_per_second`` (training only: the trial's start and its
evaluation are timed apart). Printed as ratios to the trainer alone, with the load.

    python benchmarks/trial_overhead.py [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from record import FINDINGS, write_record
from trial_work import local_spec

from raysae.core.training import train_ladder
from raysae.search.trial.spec import train_config
from raysae.search.trial.trainable import _activation_batches, make_trainer

CONFIG = {"penalty": "power", "power.p": 0.5, "power.eps": 0.0}


def alone(spec) -> float:
    torch.set_num_threads(spec.torch_threads)  # as the trial sets it
    cfg = train_config(spec, CONFIG)
    trainer = make_trainer(spec, cfg)
    batches = _activation_batches(spec, cfg, 0, cfg.seed)
    start = time.perf_counter()
    train_ladder(cfg, trainer.targets, batches, trainer=trainer)
    return trainer.tokens / (time.perf_counter() - start)


def under_tune(spec, report_seconds: float, folder: Path) -> float:
    from raysae.search.config import SearchConfig
    from raysae.search.stages import run_search
    from raysae.search.tune_setup import SearchPlan

    spec = dataclasses.replace(spec, run=dataclasses.replace(
        spec.run, report_seconds=report_seconds, checkpoint_seconds=3600.0))
    plan = SearchPlan(name="overhead", storage=str(folder / "tune"), spec=spec,
                      search=SearchConfig(targets=spec.targets, gpus_per_trial=0.0,
                                          max_concurrent=1, rung=0.0), grid=(CONFIG,))
    trials = pd.read_parquet(run_search(plan, folder / "results") / "trials.parquet")
    return float(trials["train_tokens_per_second"].iloc[0])


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=FINDINGS / "trial_overhead.json",
                        help="where the record goes (default: the committed findings)")
    args = parser.parse_args()
    spec = local_spec()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    load = os.getloadavg()[0]
    rates: dict[str, list[float]] = {"alone": [], "tune, report every 15 s": [],
                                     "tune, report every logging step": []}
    for _ in range(args.rounds):
        rates["alone"].append(alone(spec))
        with tempfile.TemporaryDirectory() as tmp:
            rates["tune, report every 15 s"].append(under_tune(spec, 15.0, Path(tmp) / "a"))
            rates["tune, report every logging step"].append(
                under_tune(spec, 0.0, Path(tmp) / "b"))
    base = max(rates["alone"])
    print(f"load {load:.2f} -> {os.getloadavg()[0]:.2f}; best of {args.rounds} rounds")
    rows = []
    for name, values in rates.items():
        best = max(values)
        rows.append({"series": name, "tokens_per_second": best, "vs_alone": best / base,
                     "all": values})
        print(f"{name:<34} {best:>10,.0f} tokens/s  {best / base:.2f}x alone")
    write_record(args.json, {"rounds": args.rounds, "rows": rows}, load)


if __name__ == "__main__":
    main()
