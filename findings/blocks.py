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
