"""How early does a proposal's ladder show its final score? The measurement multi-fidelity
rungs are chosen from (issue #28).

Runs the local default search with ``--proposals`` Optuna proposals at full budget, seed 0,
no early stopping (``--rung 0``) and every candidate rung traced (``--rung-trace``: each
proposal reports the search's own objective on held-out text at each), or reads
``--results`` of an earlier run. For each candidate rung (a fraction of the token budget) it
correlates two scores at that rung with the proposal's final objective (held-out spliced CE
+ L0 miss, the search's score):

    heldout = the search's objective of the ladder as it stands at the rung (what ASHA uses)
    train_fvu = mean over the ladder of ln(training FVU_k) at the last report <= rung

Prints Spearman's rho per rung with a bootstrap 95% interval over proposals, the final
objectives' spread across proposals (set against the 0.03-0.04 nats of seed noise at L0 8),
and, per rung, whether keeping the best third (ASHA's reduction factor 3) would have kept
the final best proposal. Nothing is timed: the machine's load does not matter.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from record import FINDINGS, write_record
from scipy import stats

from raysae.search.multifidelity import rung_tokens

RUNGS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)


def run_search(results: Path, proposals: int) -> None:
    """The local default's references and search stage, ``proposals`` proposals, seed 0."""
    cmd = [sys.executable, "-m", "raysae", "search", "--name", "rungs",
           "--num-trials", str(proposals), "--seeds", "0", "--baselines", "topk",
           "--storage", str(results / "tune"), "--results", str(results / "analysis"),
           "--rung", "0", "--rung-trace", *(f"{r:g}" for r in RUNGS[:-1]), "--no-report"]
    subprocess.run(cmd, check=True)


def reports(trial_dir: str) -> list[dict]:
    """Every report of a Tune trial (result.json: one JSON object per line)."""
    path = Path(trial_dir) / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rung_score(rows: list[dict], tokens: float) -> float:
    """Mean over the ladder of ln(training FVU) at the last report at or before ``tokens``."""
    seen = [r for r in rows if "ladder" in r and r.get("status") == "running"
            and r.get("tokens_seen", 0) <= tokens]
    if not seen:
        return math.nan
    ladder = seen[-1]["ladder"]
    return float(np.mean([math.log(max(m["fvu"], 1e-9)) for m in ladder.values()]))


def heldout_score(rows: list[dict], tokens: float) -> float:
    """The trial's held-out rung score at the traced rung nearest ``tokens`` (the final
    objective at the full budget)."""
    scored = [r for r in rows if math.isfinite(r.get("rung_objective", math.nan))]
    if tokens >= max((r.get("tokens_seen", 0) for r in rows), default=0):
        final = [r for r in rows if math.isfinite(r.get("objective", math.nan))]
        return final[-1]["objective"] if final else math.nan
    # A rung is scored after the first step that reaches its fraction of the budget, and
    # records the tokens it had seen: the traced rung for ``tokens`` is the first at or after.
    near = sorted((r for r in scored if r["rung_tokens"] >= tokens),
                  key=lambda r: r["rung_tokens"])
    return near[0]["rung_objective"] if near else math.nan


SCORES = {"heldout": heldout_score, "train_fvu": rung_score}


def table(trials: pd.DataFrame, total: float, batch: int, n_boot: int,
          seed: int) -> pd.DataFrame:
    searched = trials[trials["stage"] == "search"].drop_duplicates("tune_trial_id")
    searched = searched[searched["status"] == "finished"]
    final = searched["trial_objective"].to_numpy()
    runs = [reports(d) for d in searched["trial_dir"]]
    rng = np.random.default_rng(seed)
    best = int(np.argmin(final))
    out = []
    for (name, scorer), frac in ((item, f) for item in SCORES.items() for f in RUNGS):
        score = np.array([scorer(r, frac * total) for r in runs])
        ok = np.isfinite(score)
        if ok.sum() < 3:
            continue
        rho = stats.spearmanr(score[ok], final[ok]).statistic
        boots = []
        for _ in range(n_boot):
            pick = rng.choice(np.flatnonzero(ok), ok.sum(), replace=True)
            if len(set(pick)) > 2:
                boots.append(stats.spearmanr(score[pick], final[pick]).statistic)
        lo, hi = np.nanpercentile(boots, [2.5, 97.5])
        order = np.argsort(np.where(ok, score, np.inf))
        out.append({"score": name, "rung": frac,
                    "tokens": rung_tokens(frac, int(total), batch) if frac < 1 else int(total),
                    "proposals": int(ok.sum()), "spearman": rho, "ci_low": lo, "ci_high": hi,
                    "best_kept_top_third": bool(best in order[: math.ceil(ok.sum() / 3)]),
                    "best_kept_top_eighth": bool(best in order[: math.ceil(ok.sum() / 8)]),
                    "best_final_rank_of_rung_best": int(np.argsort(np.argsort(final))[order[0]])})
    df = pd.DataFrame(out)
    df.attrs["objective_sd"] = float(np.std(final, ddof=1))
    df.attrs["objective_range"] = float(np.ptp(final))
    return df


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("rung_correlation"),
                        help="folder of the run (reused when it holds analysis/trials.parquet)")
    parser.add_argument("--proposals", type=int, default=12)
    parser.add_argument("--boot", type=int, default=2000)
    parser.add_argument("--json", type=Path, default=FINDINGS / "rung_correlation.json",
                        help="where the record goes (default: the committed findings)")
    args = parser.parse_args()
    trials_file = args.results / "analysis" / "trials.parquet"
    if not trials_file.exists():
        run_search(args.results, args.proposals)
    trials = pd.read_parquet(trials_file)
    settings = json.loads((args.results / "analysis" / "search.json").read_text())["settings"]
    df = table(trials, float(settings["train"]["total_tokens"]),
               int(settings["train"]["batch_size"]), args.boot, 0)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"final objective across proposals: sd {df.attrs['objective_sd']:.4f}, range "
          f"{df.attrs['objective_range']:.4f} nats (seed noise at L0 8: 0.03-0.04)")
    df.to_parquet(args.results / "rung_correlation.parquet")
    run = json.loads((args.results / "analysis" / "search.json").read_text())["provenance"]
    write_record(args.json, {"run": str(args.results), "run_commit": run.get("commit"),
                             "settings": settings,
                             "objective_sd": df.attrs["objective_sd"],
                             "objective_range": df.attrs["objective_range"],
                             "rows": df.to_dict("records")}, None)


if __name__ == "__main__":
    main()
