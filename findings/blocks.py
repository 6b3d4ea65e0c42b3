"""The renderers of the docs' generated blocks: each reads committed files under findings/
and returns the Markdown that stands between ``<!-- BEGIN findings:NAME -->`` and
``<!-- END findings:NAME -->`` (findings/render.py).

A renderer is one function decorated with ``@block("NAME")``. It reads only findings/ (and
raysae's own functions that turn a results table into sentences, so the docs say what the
report says), never a run on this machine: the docs change only when a committed file does.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
RENDERERS: dict[str, Callable[[], str]] = {}
"""Block name -> its renderer (filled by ``@block``)."""


def block(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    """Register ``fn`` as the renderer of the blocks named ``name``."""
    def register(fn: Callable[[], str]) -> Callable[[], str]:
        if name in RENDERERS:
            raise ValueError(f"findings block {name!r} is registered twice")
        RENDERERS[name] = fn
        return fn
    return register


def read_json(relative: str) -> dict:
    return json.loads((HERE / relative).read_text())


def read_table(relative: str) -> pd.DataFrame:
    return pd.read_parquet(HERE / relative)


def markdown(html_text: str) -> str:
    """The report's sentences (HTML with <b>) as Markdown."""
    text = re.sub(r"</?b>", "**", html_text)
    return text.replace("&#x27;", "'").replace("&amp;", "&").replace("&lt;", "<").replace(
        "&gt;", ">")


def interval(mean: float, low: float, high: float, digits: int = 3) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{mean:+.{digits}f} (no interval)"
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def measured_on(provenance: dict) -> str:
    """'commit abc123, 2 cores of AMD EPYC, torch 2.13.0+cpu, load 0.4 -> 2.1, 2026-12-06'."""
    load = " -> ".join(f"{x:.1f}" for x in (provenance.get("load_before"),
                                            provenance.get("load_after")) if x is not None)
    dirty = " (with uncommitted changes)" if provenance.get("uncommitted_changes") else ""
    return (f"commit {str(provenance.get('commit', '?'))[:7]}{dirty}, "
            f"{provenance.get('cores', '?')} cores of {provenance.get('device', '?')}, "
            f"torch {provenance.get('torch', '?')}"
            + (f", load {load}" if load else "")
            + f", {str(provenance.get('date', '?'))[:10]}")


def table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- benchmarks


@block("benchmarks.rung_correlation")
def rung_correlation() -> str:
    d = read_json("benchmarks/rung_correlation.json")
    rows = [[f"1/{round(1 / r['rung'])}" if r["rung"] < 1 else "1 (final)",
             f"{r['tokens']:,}",
             f"{r['spearman']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]",
             r["best_final_rank_of_rung_best"] + 1,
             "yes" if r["best_kept_top_eighth"] else "no"]
            for r in d["rows"] if r["score"] == "heldout"]
    return (table(rows, ["rung", "tokens seen", "Spearman vs final (95% bootstrap)",
                         "final rank of the rung's best", "final best in the rung's top 1/8"])
            + f"\n\n{d['rows'][0]['proposals']} full-budget proposals of the default job's "
            f"search; final objective sd {d['objective_sd']:.3f}, range "
            f"{d['objective_range']:.3f} nats. Measured on "
            f"{measured_on(d['provenance'])} (`benchmarks/rung_correlation.py`).\n")


@block("benchmarks.cluster_cost")
def cluster_cost() -> str:
    d = read_json("benchmarks/cluster_cost.json")
    est, bound, usd = d["estimate"], d["bound"], d["usd_per_hour"]
    rows = [[s["stage"], f"{s['trials']} x {s['fraction']:.3g}",
             f"{s['nodes']} ({s['new_nodes']})", f"{s['wall_h']:.2f}",
             f"{s['busy_node_h']:.2f}", f"{s['held_node_h'] - s['busy_node_h']:.2f}"]
            for s in est["stages"]]
    t, b = est["total"], bound["total"]
    rows.append(["all", f"{t['ladders']:.0f} ladders", "", f"{t['wall_h']:.2f}",
                 f"{t['busy_node_h']:.2f}", f"{t['idle_node_h']:.2f}"])
    worker, head = d["cluster"]["worker"], d["cluster"]["head"]
    return (table(rows, ["stage", "trials x budget", "nodes (new)", "wall h", "busy node-h",
                         "idle node-h"])
            + f"\n\nAt {est['train_tokens_s']:,.0f} training tokens per second per worker "
            f"({est['ladder_h']:.2f} h per ladder; a node's cache build "
            f"{d['build_h']:.2f} h): the workers' {t['held_node_h']:.2f} node-hours "
            f"${t['usd_workers']:.2f} (`{worker}` ${usd[worker]} per hour), the head (`{head}` "
            f"${usd[head]}) and the EBS volumes ${t['usd_head_and_volumes']:.2f}: "
            f"**${t['usd_on_demand']:.2f} on demand**; with spot workers at an assumed "
            f"{d['spot_fraction']:.0%} of the on-demand price **${t['usd_spot']:.2f}**. At "
            f"the rate the step's work bounds ({bound['train_tokens_s']:,.0f} tokens per "
            f"second): {b['wall_h']:.2f} h, {b['busy_node_h']:.2f} busy and "
            f"{b['idle_node_h']:.2f} idle node-hours, ${b['usd_on_demand']:.2f} on demand. "
            f"Computed at {measured_on(d['provenance'])} by `benchmarks/cluster_cost.py`: an "
            "estimate, not a cluster run.\n")


@block("benchmarks.precision_quality")
def precision_quality() -> str:
    d = read_json("benchmarks/precision_quality.json")
    rows = [[f"{r['target_l0']:g}", r["n_seeds"],
             interval(r["delta_ce_mean"], r["ci_low"], r["ci_high"], 4),
             f"{r['fp32_seed_sd']:.4f}", f"{r['l0_ratio_minus_1']:+.2%}"]
            for r in d["summary"]]
    held = all(r["ci_low"] <= 0 <= r["ci_high"] for r in d["summary"])
    verdict = ("Every interval holds 0: no CE cost of bf16 was detected at this resolution."
               if held else "An interval excludes 0: bf16 changes CE here.")
    return (table(rows, ["target L0", "paired seeds", "CE bf16 - fp32 (95% t)",
                         "fp32 seed sd", "L0 bf16 / fp32 - 1"])
            + f"\n\n{verdict} Measured on {measured_on(d['provenance'])}.\n")


@block("benchmarks.step_count")
def step_count() -> str:
    d = read_json("benchmarks/step_count.json")
    rows = [[r["case"], "raysae" if r["series"] == "raysae" else r["series"], r["ops"],
             f"{r['full_passes']:.1f}", f"{r['non_matmul_gb']:.2f}",
             f"{r['passes_vs_bare']:.2f}", f"{r['bytes_vs_bare']:.2f}"]
            for r in d["rows"] if r["precision"] == "bf16"]
    return (table(rows, ["case", "series", "ops", "full-size passes", "non-matmul GB",
                         "passes / bare", "bytes / bare"])
            + f"\n\nCounted at {measured_on(d['provenance'])}.\n")


@block("benchmarks.compile_check")
def compile_check() -> str:
    d = read_json("benchmarks/compile_check.json")
    rows = [[r["case"], f"{r['eager_ms']:.1f}", f"{r['compiled_ms']:.1f}",
             f"{r['compiled_ms'] / r['eager_ms']:.2f}", f"{r['compile_seconds']:.1f}"]
            for r in d["rows"]]
    return (table(rows, ["kind / penalty", "eager ms", "compiled ms", "compiled / eager",
                         "compile s"])
            + f"\n\nMeasured on {measured_on(d['provenance'])}.\n")


@block("benchmarks.trial_overhead")
def trial_overhead() -> str:
    d = read_json("benchmarks/trial_overhead.json")
    rows = [[r["series"], f"{r['tokens_per_second']:,.0f}", f"{r['vs_alone']:.2f}"]
            for r in d["rows"]]
    return (table(rows, ["series", "training tokens per second (best of rounds)",
                         "vs alone"])
            + f"\n\nMeasured on {measured_on(d['provenance'])}.\n")


# ---------------------------------------------------------------- the default job
# findings/default_job/: command.txt, search.json, trials.parquet, comparisons.parquet (the
# run of the README's main job on the final defaults) and timing.json (its wall time beside
# the same job with one confirmation seed fewer, run back to back on the same machine).

JOB = "default_job"


def job_comparisons() -> pd.DataFrame:
    return read_table(f"{JOB}/comparisons.parquet")


def job_trials() -> pd.DataFrame:
    return read_table(f"{JOB}/trials.parquet")


def _claims():
    from raysae.analysis import claims  # the report's own sentences and tables
    return claims


def _call(row) -> str:
    if not bool(row["significant"]):
        return "n.s."
    return "better" if row["delta_ce_mean"] < 0 else "worse"


@block("default_job.answer")
def default_job_answer() -> str:
    claims = _claims()
    reach = "Does any penalty reach"  # its own block, default_job.plain, lists it by target
    items = [i for i in claims.headline(job_comparisons()) if not i.startswith(reach)]
    return "\n".join(f"- {markdown(item)}" for item in items) + "\n"


@block("default_job.plain")
def default_job_plain() -> str:
    """Per target L0: does any penalty reach TopK? (raysae.analysis.claims.baseline_reach)"""
    claims = _claims()
    baseline = claims.first_baseline()
    items = claims.baseline_reach(job_comparisons(), baseline)
    return (f"CE(penalty) - CE({baseline}) at {baseline}'s achieved L0, FCR-adjusted "
            "intervals:\n\n"
            + "\n".join(f"- {markdown(item)}" for item in items) + "\n")


@block("default_job.run")
def default_job_run() -> str:
    search = read_json(f"{JOB}/search.json")
    trials = job_trials()
    prov = search.get("provenance", {})
    hw = prov.get("hardware", {})
    stages = prov.get("stage_seconds", {})
    saes = int((trials["status"] == "finished").sum())
    stopped = trials[trials["status"] == "stopped"]
    at_rung = int((stopped["rung_tokens"] == stopped["tokens_seen"]).sum())
    per_stage = trials.groupby("stage")["tune_trial_id"].nunique()
    order = [s for s in ("refs", "search", "promote", "confirm", "budget") if s in per_stage]
    per_stage = per_stage.reindex([*order, *sorted(set(per_stage.index) - set(order))])
    command = (HERE / JOB / "command.txt").read_text().strip()
    stage_text = ", ".join(f"{name.rsplit('_', 1)[-1]} {sec:.0f} s"
                           for name, sec in stages.items())
    stage_trials = ", ".join(f"{n} {stage}" for stage, n in per_stage.items())
    return (f"`{command}` at commit {prov.get('commit', '?')}: "
            f"{trials['tune_trial_id'].nunique()} trials ({stage_trials}), {saes} finished "
            f"SAEs; the {len(stopped)} proposals stopped at their rung keep none, and "
            f"{at_rung} of them record as `rung_tokens` the tokens they had seen "
            f"({', '.join(f'{x:,}' for x in sorted(set(stopped['tokens_seen'])))}). "
            f"Stages: {stage_text} "
            f"({sum(stages.values()):.0f} s in all) on {hw.get('cpu_count', '?')} cores "
            f"({hw.get('cpu', '?')}), torch "
            f"{prov.get('versions', {}).get('torch', '?')}.\n")


@block("default_job.matrices")
def default_job_matrices() -> str:
    claims = _claims()
    comparisons = job_comparisons()
    out = []
    for ref in claims.comparison_references():
        m = claims.reference_matrix(comparisons, ref)
        if not len(m):
            continue
        header = ["label \\ target L0", *("ladder" if c == "ladder" else f"{c:g}"
                                           for c in m.columns)]
        rows = []
        for label, row in m.iterrows():
            cells = []
            for cell in row:
                if not isinstance(cell, tuple):
                    cells.append("–")
                    continue
                delta, call = cell
                cells.append({-1: f"**{delta:+.3f}** better", 1: f"{delta:+.3f} worse",
                              0: f"{delta:+.3f} ·"}[call])
            rows.append([label, *cells])
        out.append(f"Against **{ref}**:\n\n" + table(rows, header))
    return "\n\n".join(out) + "\n"


@block("default_job.multiplicity")
def default_job_multiplicity() -> str:
    claims = _claims()
    c = claims.claim_rows(job_comparisons())
    c = c[c["ci_level"].notna()]
    from raysae.analysis.multiplicity import pair_key  # each comparison once, as the family
    family = c[~c.apply(pair_key, axis=1).duplicated()]
    raw, adjusted = int(family["significant_raw"].sum()), int(family["significant"].sum())
    changed = family[family["significant_raw"].astype(bool) != family["significant"].astype(bool)]
    text = (f"Of the run's {len(family)} comparisons on the claims' basis (`matched_l0`, each "
            f"pair once), {raw} exclude 0 by their own 95% interval and {adjusted} are called "
            f"under Benjamini-Hochberg at a 5% false discovery rate; the called rows' "
            f"intervals are widened to the {family['ci_level'].iloc[0]:.2%} false-coverage "
            "level.")
    if not len(changed):
        return text + " No call changes.\n"
    lines = [[r["label"], r["reference"],
              "ladder" if pd.isna(r["target_l0"]) else f"{r['target_l0']:g}",
              interval(r["delta_ce_mean"], r["ci_low_raw"], r["ci_high_raw"]),
              interval(r["delta_ce_mean"], r["ci_low"], r["ci_high"])]
             for _, r in changed.sort_values(["reference", "label", "target_l0"]).iterrows()]
    return (text + f" The {len(changed)} calls that change (significant alone, not under "
            "the rate's control):\n\n"
            + table(lines, ["label", "against", "target L0", "raw 95%", "adjusted"]) + "\n")


@block("default_job.winner")
def default_job_winner() -> str:
    claims = _claims()
    c = claims.claim_rows(job_comparisons())
    best = claims._best_searched(c[c["target_l0"].isna()])
    if best is None:
        return "No searched proposal was confirmed.\n"
    rows = c[(c["label"] == best)].sort_values(["reference", "target_l0"], na_position="last")
    lines = [[r["reference"], "ladder" if pd.isna(r["target_l0"]) else f"{r['target_l0']:g}",
              int(r["n_seeds"]), interval(r["delta_ce_mean"], r["ci_low"], r["ci_high"]),
              _call(r)] for _, r in rows.iterrows()]
    return (f"The searched winner, **{best}**, on its fresh seeds only (the seed that chose "
            "it is left out), against each reference; adjusted intervals:\n\n"
            + table(lines, ["against", "target L0", "fresh seeds", "CE difference", "call"])
            + "\n")


@block("default_job.l0")
def default_job_l0() -> str:
    t = job_trials()
    t = t[(t["status"] == "finished") & t["target_l0"].notna()]
    miss = (t["l0"] / t["target_l0"] - 1.0)
    rows = []
    for label, g in t.assign(miss=miss).groupby("label"):
        within = int((g["miss"].abs() <= 0.05).sum())
        worst = g.loc[g["miss"].abs().idxmax(), "miss"]
        rows.append([label, f"{within} of {len(g)}", f"{g['miss'].abs().mean():.1%}",
                     f"{worst:+.1%}"])
    return (table(rows, ["label", "within 5% of target", "mean abs. miss", "worst miss"])
            + "\n\nHeld-out L0 against each SAE's target L0.\n")


@block("default_job.seeds_price")
def default_job_seeds_price() -> str:
    d = read_json(f"{JOB}/timing.json")
    rows = [[r["label"], r["seeds"], r["trials"], r["sae_rows"], f"{r['wall_s']:.0f}",
             ", ".join(f"{k} {v:.0f}" for k, v in r["stage_seconds"].items()),
             f"{r['load_start']:.1f} -> {r['load_end']:.1f}"] for r in d["runs"]]
    before, after = d["runs"][0], d["runs"][1]
    return (table(rows, ["run", "--seeds", "trials", "SAE rows", "wall s", "stage s", "load"])
            + f"\n\nThe default's fourth seed costs {after['wall_s'] - before['wall_s']:.0f} s "
            f"of wall time, {after['wall_s'] / before['wall_s']:.2f}x the three-seed job's; "
            f"both back to back on {d['machine']}, commit {d['commit'][:7]}, no test or "
            "other job beside them. The references stage, the same work in both, took "
            f"{before['stage_seconds']['refs']:.0f} s and {after['stage_seconds']['refs']:.0f} s:"
            " the run-to-run noise of this comparison.\n")
