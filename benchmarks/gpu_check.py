"""One command that measures a GPU: what raysae's training gets out of the machine it runs on.

    python benchmarks/gpu_check.py [--small] [--search-seconds 120] [--out gpu_check.md]
                                   [--json gpu_check.json] [--no-compile]

On CUDA at the pythia-70m preset's shape (d_in 512 -> d_sae 2048, batch 4096, a 6-SAE ladder
8 .. 256); on a machine without CUDA at the local default's (128 -> 512, batch 512, ladder
4 .. 128), saying that no GPU was found. Every number is measured in this run; ratios are
against a baseline of the same run. Sections:

1. step: for L1, sqrt and TopK, the bare loop of the same math (benchmarks/bare_loop.py:
   plain eager PyTorch, frozen) and raysae's ladder step (the same math plus its controller,
   dead tracking and NaN safety), each in fp32, TF32 and bf16 autocast, eager and compiled
   (torch.compile; raysae's ``--compile on``); tokens/s (ladder tokens: each feeds K SAEs)
   and each series against the bare eager loop of its case and precision.
2. kinds: TopK and BatchTopK ladder steps with the dense decoder and the fixed-k decoder.
3. feed: a float16 cache read into the device, blocking copies vs. the overlapped feed
   (raysae.core.transfer), alone and with the ladder step consuming each batch.
4. sync: 100 steps of each kind under ``torch.cuda.set_sync_debug_mode("warn")`` (none are
   logging steps): synchronisations counted (CUDA only).
5. features: one SAE's feature statistics (the trial's evaluation work beside spliced CE)
   over activations on the device and on the host, tokens/s.
6. search: a pythia-shaped (or, without CUDA, the local default's) search run for about
   ``--search-seconds`` through the real CLI; training tokens/s per trial. Needs Ray and
   TransformerLens importable; says so when they are not.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from bare_loop import CASES, PRECISIONS, bare_loop, raysae_ladder, shape
from record import write_record
from timing import median_times

from raysae.core.config import PenaltyConfig, SAEConfig, TrainConfig
from raysae.core.ladder import LadderTrainer
from raysae.core.transfer import device_batches, to_compute

ROOT = Path(__file__).resolve().parents[1]


def ladder(s: dict, device: str, *, kind: str = "relu", precision: str = "bf16",
           sparse_step: str = "off", steps: int = 10**6) -> LadderTrainer:
    """raysae's sqrt ladder (or another kind) at shape ``s``, no logging steps."""
    bf16, tf32 = PRECISIONS[precision]
    cfg = TrainConfig(sae=SAEConfig(s["d_in"], s["d_sae"]), penalty=PenaltyConfig.power(0.5),
                      kind=kind, batch_size=s["batch"], total_tokens=s["batch"] * steps,
                      device=device, log_every=10**9, l0_target=None, autocast_bf16=bf16,
                      tf32=tf32, sparse_step=sparse_step)
    return LadderTrainer(cfg, s["targets"])


def rate(seconds: float, rows: int) -> str:
    return f"{rows / seconds:,.0f}"


def section_step(s: dict, device: str, rounds: int, compiled: bool) -> list[dict]:
    """Every case x precision x (eager, compiled): bare loop and raysae (module doc)."""
    x = torch.randn(s["batch"], s["d_in"], device=device) * 3
    fns = {}
    for case in CASES:
        for p in PRECISIONS:
            for mode in ("eager", "compiled") if compiled else ("eager",):
                bare = bare_loop(s, device, case, p)
                if mode == "compiled":
                    bare = torch.compile(bare)
                fns[("bare", case, p, mode)] = (lambda f=bare: f(x))
                trainer = raysae_ladder(s, device, case, p,
                                        compile="on" if mode == "compiled" else "off")
                trainer.step(x)  # the activation scale (one sync), and the compilation
                fns[("raysae", case, p, mode)] = (lambda t=trainer: t.step(x))
    times = median_times(fns, rounds, device)
    rows = []
    for (series, case, p, mode), t in times.items():
        base = times[("bare", case, p, "eager")]
        rows.append({"series": series, "case": case, "precision": p, "mode": mode,
                     "ms_per_step": t * 1e3, "tokens_per_second": s["batch"] / t,
                     "vs_bare_eager": base / t})
    return rows


def section_kinds(s: dict, device: str, rounds: int) -> list[tuple]:
    """Both fixed-k kinds on the whole ladder and on its low rungs (k <= 1/16 of d_sae):
    the fixed-k decoder's cost follows the kept entries, the dense one's does not."""
    x = torch.randn(s["batch"], s["d_in"], device=device)
    low = {**s, "targets": [t for t in s["targets"] if t <= s["d_sae"] / 16]}
    fns = {}
    for name, shape_ in (("ladder", s), ("low rungs", low)):
        for kind in ("topk", "batchtopk"):
            for mode in ("off", "on"):
                trainer = ladder(shape_, device, kind=kind, sparse_step=mode)
                trainer.step(x)
                fns[(name, kind, mode)] = (lambda t=trainer: t.step(x))
    times = median_times(fns, rounds, device)
    out = []
    for (name, kind, mode), t in times.items():
        base = times[(name, kind, "off")]
        targets = (s if name == "ladder" else low)["targets"]
        out.append((f"{kind} {name} {targets[0]:g}..{targets[-1]:g}",
                    "fixed-k" if mode == "on" else "dense", f"{t * 1e3:.2f}",
                    rate(t, s["batch"]), f"{base / t:.2f}"))
    return out


def synthetic_cache(folder: Path, rows: int, d_in: int) -> Path:
    from raysae.activations.cache import write_arrays_cache

    rng = np.random.default_rng(0)
    acts = rng.standard_normal((rows, d_in), dtype=np.float32).astype(np.float16)
    return write_arrays_cache(folder / "cache", acts, "float16")


def section_feed(s: dict, device: str, cache: Path, n_batches: int) -> list[tuple]:
    from raysae.activations.batches import iter_activation_batches

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    trainer = ladder(s, device)
    trainer.step(torch.randn(s["batch"], s["d_in"], device=device))

    def run(overlap: bool, train: bool) -> float:
        batches = iter_activation_batches(cache, s["batch"], n_tokens=s["batch"] * n_batches)
        first = next(batches)  # the reader thread is up and its queue full before timing
        time.sleep(0.5)
        sync()
        start = time.perf_counter()
        stream = device_batches(batches, dev) if overlap else batches
        for x in stream:
            # blocking: a plain copy (pageable or pinned) then the conversion, as before
            x = to_compute(x, dev) if overlap else x.to(dev).to(torch.float32)
            if train:
                trainer.step(x)
        sync()
        del first
        return time.perf_counter() - start

    rows, out = s["batch"] * (n_batches - 1), []
    for train in (False, True):
        base = None
        for overlap in (False, True):
            run(overlap, train)  # warm
            t = min(run(overlap, train) for _ in range(2))
            base = base or t
            what = "read+copy+step" if train else "read+copy"
            name = f"{what} {'overlapped' if overlap else 'blocking'}"
            gbs = rows * s["d_in"] * 2 / t / 1e9
            out.append((name, f"{t / (n_batches - 1) * 1e3:.2f}", rate(t, rows),
                        f"{base / t:.2f}", f"{gbs:.2f} GB/s"))
    return out


def section_sync(s: dict, device: str, cache: Path) -> list[tuple]:
    from raysae.activations.batches import iter_activation_batches

    out = []
    for kind, mode in (("relu", "auto"), ("topk", "auto"), ("batchtopk", "auto"),
                       ("topk", "off")):
        trainer = ladder(s, device, kind=kind, sparse_step=mode, steps=200)
        batches = device_batches(iter_activation_batches(cache, s["batch"],
                                                          n_tokens=s["batch"] * 102), device)
        trainer.step(next(batches))  # the first step estimates the activation scale
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _, x in zip(range(100), batches, strict=False):
                    trainer.step(x)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # (the mode's own "prototype feature" notice is not a synchronisation)
        syncs = [w for w in caught if "called a synchronizing" in str(w.message)]
        where = sorted({str(w.filename).split("/")[-1] + f":{w.lineno}" for w in syncs})
        out.append((f"{kind} (sparse_step {mode})", str(len(syncs)), ", ".join(where[:4]) or "-"))
    return out


def section_features(s: dict, device: str, n_tokens: int) -> list[tuple]:
    """Feature statistics of one SAE (raysae.evaluation.feature_stats) over ``n_tokens``
    activations held on the device and on the host; about 2% of features fire per token."""
    from raysae.core.sae import SAE
    from raysae.evaluation.feature_stats import feature_statistics

    sae = SAE(SAEConfig(s["d_in"], s["d_sae"]), seed=0).to(device)
    with torch.no_grad():  # a threshold that leaves ~2% of the features active
        pre = torch.randn(4096, s["d_in"], device=device) @ sae.W_enc
        sae.b_enc.copy_(-pre.quantile(0.98, dim=0))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = []
    for where in ("device", "host"):
        acts = torch.randn(n_tokens, s["d_in"], device=device if where == "device" else "cpu")
        feature_statistics(acts[:8192], sae, 8192)  # warm
        sync()
        start = time.perf_counter()
        per_feature, _ = feature_statistics(acts, sae, n_tokens)
        sync()
        t = time.perf_counter() - start
        out.append((f"activations on the {where}", f"{t:.2f}", rate(t, n_tokens),
                    f"{per_feature['frequency'].mean():.3f}"))
    return out


def section_search(small: bool, seconds: float, workdir: Path) -> tuple[list[tuple], str]:
    try:
        import ray  # noqa: F401
        import transformer_lens  # noqa: F401
    except ImportError as err:
        return [], (f"skipped: {err.name} is not importable here (the search needs Ray "
                    "and TransformerLens)")
    sys.path.insert(0, str(ROOT / "tests"))
    # the machine's own model and cache folder: the local model is built once per machine
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_ADDRESS": "",
           "RAYSAE_RAY_ADDRESS": "", "TOKENIZERS_PARALLELISM": "false"}
    results = workdir / "results"
    if small:
        tokens = max(int(seconds * 2_000), 65_536)  # ~2k ladder tokens/s on 2 CPU cores
        model = []
        args = ["--total-tokens", str(tokens), "--cache-tokens", str(tokens),
                "--num-trials", "1", "--seeds", "0", "--eval-blocks", "8"]
    else:
        from pythia_checkpoint import build_pythia70m_checkpoint

        pythia = build_pythia70m_checkpoint(workdir / "pythia-70m-random")
        tokens = int(seconds * 400_000)
        model = ["--preset", "pythia-70m", "--model", str(pythia)]
        args = ["--total-tokens", str(tokens), "--cache-tokens", str(min(tokens, 20_000_000)),
                "--num-trials", "1", "--seeds", "0", "--eval-blocks", "32",
                "--feature-tokens", "200000"]
    cmd = [sys.executable, "-m", "raysae", "search", *model, "--corpus", "stdlib",
           "--address", "local", *args, "--storage", str(workdir / "tune"),
           "--results", str(results), "--name", "gpu_check"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return [], f"the search failed (exit {done.returncode}): {done.stderr[-800:]}"
    import pandas as pd

    trials = pd.read_parquet(results / "trials.parquet").drop_duplicates("tune_trial_id")
    rows = [(f"{t.stage} {t.label}", f"{int(t.tokens_seen):,}", f"{t.train_seconds:.1f}",
             f"{t.train_tokens_per_second:,.0f}", f"{t.eval_seconds:.1f}")
            for t in trials.itertuples()]
    return rows, f"whole search {wall:.0f} s, {len(trials)} trials"


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True)
    return done.stdout.strip() or "unknown"


def table(title: str, head: tuple, rows: list[tuple]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true",
                        help="the local default's shape even on CUDA (the default without CUDA)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per series")
    parser.add_argument("--search-seconds", type=float, default=120.0,
                        help="about how long the search section trains (0: skip it)")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here")
    parser.add_argument("--json", type=Path, default=None,
                        help="write the step table with versions, device and load here")
    parser.add_argument("--no-compile", action="store_true",
                        help="eager series only (torch.compile takes minutes on a CPU)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device, small = ("cuda" if cuda else "cpu"), args.small or not cuda
    s = shape(small)
    rounds = args.rounds or (30 if cuda else 10)
    lines = []
    if cuda:
        props = torch.cuda.get_device_properties(0)
        lines.append(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, torch "
                     f"{torch.__version__}\n")
    else:
        lines.append(f"No GPU found (torch.cuda.is_available() is False): CPU, "
                     f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}\n")
    lines.append(f"shape: d_in {s['d_in']} -> d_sae {s['d_sae']}, batch {s['batch']}, ladder "
                 f"{s['targets']}\n")
    emit = print

    def add(text: str) -> None:
        lines.append(text)
        emit(text, flush=True)

    emit("\n".join(lines))
    record = {"torch": torch.__version__, "cuda": torch.version.cuda,
              "device": (torch.cuda.get_device_name(0) if cuda else "cpu"),
              "load_before": os.getloadavg()[0], "shape": s, "commit": _commit()}
    steps = section_step(s, device, rounds, compiled=not args.no_compile)
    record["step"] = steps
    add(table("1. ladder step (tokens/s: ladder tokens; ratio: the bare eager loop's time of "
              "the same case and precision / this time)",
              ("series", "case", "precision", "mode", "ms/step", "tokens/s", "vs bare eager"),
              [(r["series"], r["case"], r["precision"], r["mode"], f"{r['ms_per_step']:.2f}",
                rate(r["ms_per_step"] / 1e3, s["batch"]), f"{r['vs_bare_eager']:.2f}")
               for r in steps]))
    add(table("2. fixed-k kinds (ratio: dense decoder time / this time)",
              ("ladder", "decoder", "ms/step", "tokens/s", "vs dense"),
              section_kinds(s, device, rounds)))
    with tempfile.TemporaryDirectory() as tmp:
        n_batches = 200 if cuda else 60
        cache = synthetic_cache(Path(tmp), s["batch"] * 64, s["d_in"])
        add(table("3. feed: float16 cache -> device float32 (ratio: blocking / this)",
                  ("series", "ms/batch", "rows/s", "vs blocking", "copy rate"),
                  section_feed(s, device, cache, n_batches)))
        if cuda:
            add(table("4. synchronisations in 100 non-logging steps (sync debug mode)",
                      ("kind", "syncs", "where"), section_sync(s, device, cache)))
        else:
            add("### 4. synchronisations\n\nnot measured: no CUDA device\n")
    add(table("5. feature statistics (per SAE)", ("source", "s", "tokens/s", "mean frequency"),
              section_features(s, device, 1_048_576 if cuda else 65_536)))
    if args.search_seconds > 0:
        with tempfile.TemporaryDirectory() as tmp:
            rows, note = section_search(small, args.search_seconds, Path(tmp))
        add(table(f"6. search ({note})",
                  ("trial", "ladder tokens", "train s", "tokens/s", "eval s"), rows))
    if args.out:
        args.out.write_text("\n".join(lines))
    if args.json:
        write_record(args.json, record, record["load_before"])


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
