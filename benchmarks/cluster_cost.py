"""What the pythia-70m preset's whole search costs on the documented cluster: an estimate,
not a run (docs/cluster.md, "What the search costs"). Every input is a number measured here
or a stated public rate or spec (``MEASURED``, ``STATED``, ``USD_PER_HOUR``); the stages are
counted from the preset's own config and the node types read from cluster.yaml, so the
table follows them when they change.

The model: each GPU node trains at the A10G's estimated ladder rate whatever the number of
trials sharing its GPU (the estimate is GPU-bound, and time-sliced trials add no GPU);
trials are dealt evenly over the nodes a stage holds; a node's first trial builds the
node's cache before any trial there trains; nodes are held from their first stage until the
last stage ends (the driver's keep-nodes hold). Node start-up (boot, setup commands) and
evaluation are not counted.

    python benchmarks/cluster_cost.py [--spot-fraction 0.4] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import yaml
from record import FINDINGS, write_record

from raysae.search.cache_plan import cache_bytes, cache_rows
from raysae.search.capacity import GPU_SHARE, trials_per_node
from raysae.search.config import job_config
from raysae.search.multifidelity import rung_tokens
from raysae.search.space import reference_configs

ROOT = Path(__file__).resolve().parents[1]
MEASURED = {
    "harvest_cpu_tokens_s": 2637.0,
    # benchmarks/harvest_throughput.py on this machine (2 cores of an AMD EPYC, Zen 4),
    # 2026-12-06: the bare loop stopped after block 4 of the Pythia-70M-shaped model, fp32,
    # wall tokens/s with 2 torch threads; load average 7.1 when it ended (1.65 before)
    "tokenize_tokens_per_cpu_s": 500_000.0,
    # source_blocks() over the stdlib with the local 4,096-token BPE, 1M -> 3M tokens:
    # 2M tokens in 4.0 more CPU seconds; load 3.5-3.6 (a stand-in for Pythia's tokenizer)
    "sha256_gb_s": 1.75,  # hashlib.sha256 over 1 GiB, one core, best of 3; load 3.7
}
STATED = {
    "h200_ladder_tokens_s": 893_978.0,  # README: H200, bf16 ladder step, the preset's shape
    "h200_bf16_tflops": 989.0,  # NVIDIA H200 SXM, dense bf16 (1,979 with sparsity)
    "h200_gb_s": 4800.0,  # NVIDIA H200 SXM, HBM3e
    "a10g_bf16_tflops": 70.0,  # A10G, dense bf16 (third-party tables; the A10's is 125)
    "a10g_fp32_tflops": 31.2,  # A10 datasheet (A10G tables list about the same)
    "a10g_gb_s": 600.0,  # A10G, GDDR6
    "cpu_fp32_gflops": 2 * 32 * 2.596,  # 2 Zen 4 cores x 32 FP32 FLOP/cycle x 2.596 GHz
    "gp3_usd_per_gb_month": 0.08,  # EBS gp3, us-east-1 list price
}
STEP_COUNT = ROOT / "benchmarks" / "results" / "step_count.json"
STEP_CASE = ("L1", "bf16", "raysae")
"""The counted step whose traffic bounds the A10G's step (benchmarks/step_count.py)."""
USD_PER_HOUR = {"g5.2xlarge": 1.212, "m5.xlarge": 0.192}
"""On-demand Linux prices in us-east-1, AWS list prices when this was written."""
HOURS_PER_MONTH = 730.0


def rates() -> dict:
    """The A10G's estimated rates: training by the slower of the bf16-FLOP and bandwidth
    ratios to the H200's measured step; harvest by the FP32-FLOP ratio to this CPU. Also a
    bound: the step's own work (its matmul FLOPs at the preset's shape; its other traffic
    counted in step_count.json) at the A10G's peak rates, a step no GPU can beat."""
    train_flop = STATED["a10g_bf16_tflops"] / STATED["h200_bf16_tflops"]
    train_bw = STATED["a10g_gb_s"] / STATED["h200_gb_s"]
    harvest = STATED["a10g_fp32_tflops"] * 1000 / STATED["cpu_fp32_gflops"]
    cfg = job_config("pythia-70m")
    batch, members, d_in = cfg.train.batch_size, len(cfg.search.targets), 512
    flops = members * 5 * 2 * batch * d_in * d_in * cfg.model.expansion  # 2 fwd + 3 bwd
    counted = json.loads(STEP_COUNT.read_text())["rows"]
    traffic = next(r["non_matmul_gb"] for r in counted if (r["case"], r["precision"],
                                                            r["series"]) == STEP_CASE)
    step_s = flops / (STATED["a10g_bf16_tflops"] * 1e12) + traffic / STATED["a10g_gb_s"]
    return {"train_flop_ratio": train_flop, "train_bandwidth_ratio": train_bw,
            "train_tokens_s": STATED["h200_ladder_tokens_s"] * min(train_flop, train_bw),
            "step_gflop": flops / 1e9, "step_other_gb": traffic,
            "train_bound_tokens_s": batch / step_s, "harvest_ratio": harvest,
            "harvest_tokens_s": MEASURED["harvest_cpu_tokens_s"] * harvest}


def cluster() -> dict:
    """The documented cluster from cluster.yaml: worker and head types, trials per node."""
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    head = raw["head_node_type"]
    (name, worker), = ((k, v) for k, v in raw["available_node_types"].items() if k != head)
    cfg = job_config("pythia-70m")
    per_node = trials_per_node(worker["resources"], cfg.search.cpus_per_trial, GPU_SHARE)
    disk = lambda t: sum(m["Ebs"]["VolumeSize"] for m in t["node_config"]["BlockDeviceMappings"])  # noqa: E731
    return {"worker": worker["node_config"]["InstanceType"],
            "head": raw["available_node_types"][head]["node_config"]["InstanceType"],
            "nodes": min(int(worker["max_workers"]), int(raw["max_workers"])),
            "trials_per_node": per_node, "worker_root_gb": disk(worker),
            "head_root_gb": disk(raw["available_node_types"][head])}


def stages() -> list[dict]:
    """The preset's stages (stages.py): trials and the budget fraction each trains."""
    cfg = job_config("pythia-70m")
    s, total = cfg.search, cfg.train.total_tokens
    refs = len(reference_configs(tuple(s.baselines)))
    rung = rung_tokens(s.rung, total, cfg.train.batch_size) / total
    return [{"stage": "refs", "trials": refs, "fraction": 1.0},
            {"stage": "search", "trials": s.num_trials, "fraction": rung},
            {"stage": "promote", "trials": s.promote, "fraction": 1.0},
            {"stage": "confirm", "trials": (refs + s.confirm_best) * (s.seeds - 1),
             "fraction": 1.0}]


def build_hours(rows: int, nbytes: int, harvest_tokens_s: float) -> float:
    """One node's cache build: tokenize (one core), harvest on the GPU, hash as written."""
    return (rows / MEASURED["tokenize_tokens_per_cpu_s"] + rows / harvest_tokens_s
            + nbytes / (MEASURED["sha256_gb_s"] * 1e9)) / 3600


def schedule(plan: list[dict], where: dict, ladder_hours: float, build: float) -> list[dict]:
    """Per stage: nodes held, wall hours, busy and held node-hours (see the module doc)."""
    held, out = 0, []
    for st in plan:
        need = min(math.ceil(st["trials"] / where["trials_per_node"]), where["nodes"])
        new, held = max(need - held, 0), max(held, need)
        dealt = [st["trials"] // held + (i < st["trials"] % held) for i in range(held)]
        times = [n * st["fraction"] * ladder_hours + (build if i >= held - new else 0.0)
                 for i, n in enumerate(dealt)]
        wall = max(times)
        out.append({**st, "nodes": held, "new_nodes": new, "wall_h": wall,
                    "busy_node_h": sum(times), "held_node_h": held * wall})
    return out


def costs(where: dict, rows: list[dict], spot_fraction: float) -> dict:
    """Totals of a schedule: hours, node-hours and dollars (workers at on-demand and at
    ``spot_fraction`` of it; the head and the EBS volumes at on-demand)."""
    wall = sum(r["wall_h"] for r in rows)
    held = sum(r["held_node_h"] for r in rows)
    busy = sum(r["busy_node_h"] for r in rows)
    gp3 = STATED["gp3_usd_per_gb_month"] / HOURS_PER_MONTH
    workers = held * USD_PER_HOUR[where["worker"]]
    other = (held * where["worker_root_gb"] * gp3
             + wall * (USD_PER_HOUR[where["head"]] + where["head_root_gb"] * gp3))
    return {"wall_h": wall, "busy_node_h": busy, "idle_node_h": held - busy,
            "held_node_h": held, "ladders": sum(r["trials"] * r["fraction"] for r in rows),
            "usd_workers": workers, "usd_head_and_volumes": other,
            "usd_on_demand": workers + other, "usd_spot": workers * spot_fraction + other}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spot-fraction", type=float, default=0.4,
                        help="spot price as a fraction of on-demand: an assumption, not a "
                             "quote (look yours up with describe-spot-price-history)")
    parser.add_argument("--train-tokens-s", type=float, default=None,
                        help="a measured ladder rate of one worker GPU (gpu_check.py) "
                             "instead of the estimate")
    parser.add_argument("--json", default=str(FINDINGS / "cluster_cost.json"))
    args = parser.parse_args(argv)
    cfg, where, rate = job_config("pythia-70m"), cluster(), rates()
    nbytes = cache_bytes(cfg, 512)
    build = build_hours(cache_rows(cfg), nbytes, rate["harvest_tokens_s"])
    out = {}
    for case, tokens_s in (("estimate", args.train_tokens_s or rate["train_tokens_s"]),
                           ("bound", rate["train_bound_tokens_s"])):
        ladder_h = cfg.train.total_tokens / tokens_s / 3600
        rows = schedule(stages(), where, ladder_h, build)
        out[case] = {"train_tokens_s": tokens_s, "ladder_h": ladder_h, "stages": rows,
                     "total": costs(where, rows, args.spot_fraction)}
    est = out["estimate"]
    print(f"A10G: training {est['train_tokens_s']:,.0f} ladder tokens/s per GPU (H200 x"
          f"{rate['train_flop_ratio']:.4f} bf16 FLOPs, x{rate['train_bandwidth_ratio']:.3f} "
          f"bandwidth; bound {rate['train_bound_tokens_s']:,.0f}: {rate['step_gflop']:.0f} "
          f"GFLOP + {rate['step_other_gb']:.2f} GB a step at peak), harvest "
          f"{rate['harvest_tokens_s']:,.0f} tokens/s (CPU x{rate['harvest_ratio']:.1f}); "
          f"a 400M-token ladder {est['ladder_h']:.2f} h; a node's cache build "
          f"({nbytes / 1e9:.0f} GB) {build:.2f} h")
    print("| stage | trials x budget | nodes (new) | wall h | busy node-h | idle node-h |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in est["stages"]:
        print(f"| {r['stage']} | {r['trials']} x {r['fraction']:.4g} | {r['nodes']} "
              f"({r['new_nodes']}) | {r['wall_h']:.2f} | {r['busy_node_h']:.2f} | "
              f"{r['held_node_h'] - r['busy_node_h']:.2f} |")
    for case in ("estimate", "bound"):
        t = out[case]["total"]
        print(f"{case}: {t['ladders']:.4g} full-budget ladders, {t['wall_h']:.2f} h, "
              f"{t['busy_node_h']:.2f} busy + {t['idle_node_h']:.2f} idle GPU node-h; "
              f"on-demand ${t['usd_on_demand']:.2f} (GPU workers ${t['usd_workers']:.2f}, "
              f"head and EBS ${t['usd_head_and_volumes']:.2f}); spot workers at "
              f"{args.spot_fraction:g} of on-demand ${t['usd_spot']:.2f}")
    write_record(args.json, {"measured": MEASURED, "stated": STATED, "usd_per_hour":
                             USD_PER_HOUR, "spot_fraction": args.spot_fraction,
                             "cluster": where, "rates": rate, "cache_bytes": nbytes,
                             "build_h": build, **out}, load_before=None)


if __name__ == "__main__":
    main()
