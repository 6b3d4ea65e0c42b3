"""The one prepared GPU rehearsal (issue #38): raysae's real search on a lent GPU machine.

On the lent machine (15 minutes of device time, nothing downloadable), one `run` tool call
that carries the site archive built here by ``python benchmarks/pack_gpu_site.py``:

    run(command="python3 benchmarks/gpu_rehearsal.py --out $OUT",
        carry=[".gpu_site.tar.xz"], timeout_s=420)

It stops itself within ``--budget-seconds`` (330: the search is interrupted when it would run
past it, and what it reported so far is still summarised), so with the machine's start (a
few minutes, counted) a rerun still fits in the 15 minutes; give the machine back afterwards
unless rerunning at once. Everything lands in ``--out``
(default ``$OUT``, else ./gpu_rehearsal_out): rehearsal.log (what is printed), summary.json,
search_stdout.log, nvidia_smi.csv, trials.parquet, search.json, cache_manifest.json.

Steps:

0. site: when raysae's dependencies that the GPU image lacks (Ray, Optuna,
   TransformerLens, ...) are not importable and ``.gpu_site.tar.xz`` is at the repository
   root, it is unpacked into a temporary folder put first on ``sys.path`` and on
   ``PYTHONPATH`` (with the repository root, so Ray's worker processes import both). The
   shipped distributions' requirements are checked against what the image has (printed).
1. a random-weight checkpoint with Pythia-70M-deduped's exact config
   (tests/pythia_checkpoint.py) and the stdlib corpus (the Python standard library's
   sources: offline, ~3.1M tokens with that checkpoint's tokenizer, read by raysae itself).
2. sync check: 100 steps of a raysae ladder (LadderTrainer, d_in 512, d_sae 2048, batch
   4096, targets 8 .. 256; relu and topk, no logging step among them) under
   ``torch.cuda.set_sync_debug_mode("error")`` after one warm-up step; the first step that
   synchronises is named, with where (run first: it is quick and its answer is the sharpest).
3. the real CLI: ``python -m raysae search --preset pythia-70m --model <checkpoint> --corpus
   stdlib --address local --gpus-per-trial 0.25 --max-concurrent 4 --num-trials 1 --seeds 0
   --baselines topk`` (4 references sharing the GPU, then one proposal; 6 targets) with small
   token counts, the harvest on the GPU (a fresh private cache), while ``nvidia-smi`` samples
   utilisation every 500 ms. Stopped at the budget's end if still running.
4. summary: harvest tokens/s (cache manifest: rows / build_seconds), each trial's
   ``train_tokens_per_second``, ``train_seconds``, ``eval_seconds``, ``setup_seconds``
   (trials.parquet), GPU utilisation (mean, p50, p90), and search.json's provenance (stage
   wall times and where the core-seconds went).

``--cpu`` (automatic without CUDA): the same sequence at a small shape on CPU, so a test can
run it (tests/test_gpu_rehearsal.py): the local model (``LocalModelSpec.tiny()``, built in
seconds; ``--local-model default`` for the project's default local model, ~3 minutes to
build once), no --preset, tiny token counts, ``--gpus-per-trial 0``; no nvidia-smi and no
sync check (both said so).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT / ".gpu_site.tar.xz"
NEEDED = ("ray", "optuna", "transformer_lens", "datasets", "moocore", "zstandard")
"""Modules raysae imports that the GPU image lacks (benchmarks/pack_gpu_site.py ships them)."""
TARGETS = (8.0, 16.0, 32.0, 64.0, 128.0, 256.0)
START = time.perf_counter()
LOG: list[str] = []
UNPACKED: list[Path] = []
"""The temporary site folder, removed at the end."""


def say(text: str = "") -> None:
    """Print with the elapsed time; kept for rehearsal.log."""
    line = f"[{time.perf_counter() - START:6.1f} s] {text}" if text else ""
    print(line, flush=True)
    LOG.append(line)


# --- 0. the site of shipped distributions -------------------------------------------------


def importable(module: str) -> bool:
    """A real package (not a same-named folder, e.g. Ray's /tmp/ray, as a namespace)."""
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.origin is not None


def ensure_site(archive: Path) -> Path | None:
    """Unpack ``archive`` when a needed module is missing; returns the site folder (or None
    when nothing had to be unpacked). Children see it through PYTHONPATH."""
    paths = [str(ROOT)]
    site = None
    missing = [m for m in NEEDED if not importable(m)]
    if missing:
        if not archive.exists():
            raise SystemExit(f"{', '.join(missing)} not importable and no {archive.name} here: "
                             "build it with benchmarks/pack_gpu_site.py and carry it")
        start = time.perf_counter()
        folder = Path(tempfile.mkdtemp(prefix="raysae-gpu-site-"))
        with tarfile.open(archive, "r:xz") as tar:
            if sys.version_info >= (3, 12):
                tar.extractall(folder, filter="data")
            else:
                tar.extractall(folder)  # noqa: S202  (our own archive)
        site = folder / "gpu_site"
        UNPACKED.append(folder)
        paths.insert(0, str(site))
        say(f"site: {', '.join(missing)} missing; unpacked {archive.name} "
            f"({archive.stat().st_size / 2**20:.1f} MiB) into {site} in "
            f"{time.perf_counter() - start:.1f} s")
    else:
        say(f"site: {', '.join(NEEDED)} importable, nothing unpacked")
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + ([old] if old else []))
    importlib.invalidate_caches()
    still = [m for m in NEEDED if not importable(m)]
    if still:
        raise SystemExit(f"still not importable after unpacking: {', '.join(still)}")
    return site


def check_requirements(site: Path | None) -> list[str]:
    """The shipped distributions' requirements that what is installed does not meet (those
    the packer left out on purpose, listed in the site's gpu_site.json, excepted)."""
    if site is None:
        return []
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env = {"extra": ""}
    listing = site / "gpu_site.json"
    left_out = json.loads(listing.read_text()).get("left_out", {}) if listing.exists() else {}
    problems = []
    for dist in md.distributions(path=[str(site)]):
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            if canonicalize_name(req.name) in left_out:
                continue
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                problems.append(f"{dist.metadata['Name']} needs {req}: not installed")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{dist.metadata['Name']} needs {req}: {have} installed")
    return sorted(set(problems))


def environment(site: Path | None) -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__,
            "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    for name in ("ray", "optuna", "transformer-lens", "transformers", "datasets", "numpy",
                 "pandas", "pyarrow", "huggingface-hub"):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            info[name] = None
    info["requirement_problems"] = check_requirements(site)
    return info


# --- 2. the sync check --------------------------------------------------------------------


def sync_check(steps: int = 100) -> list[dict]:
    """``steps`` ladder steps per kind under sync debug mode "error", after one warm-up step
    (it estimates the activation scale: one sync by design). No logging step among them."""
    import torch

    from raysae.core.config import SAEConfig, TrainConfig
    from raysae.core.ladder import LadderTrainer

    out = []
    for kind in ("relu", "topk"):
        cfg = TrainConfig(sae=SAEConfig(512, 2048), kind=kind, batch_size=4096,
                          total_tokens=4096 * (steps + 50), device="cuda", log_every=10**9)
        trainer = LadderTrainer(cfg, TARGETS)
        gen = torch.Generator(device="cuda").manual_seed(0)
        xs = [torch.randn(4096, 512, device="cuda", generator=gen) for _ in range(4)]
        trainer.step(xs[0])
        torch.cuda.synchronize()
        row = {"kind": kind, "steps": steps, "synced_at_step": None, "where": None}
        start = time.perf_counter()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i in range(steps):
                trainer.step(xs[i % len(xs)])
        except RuntimeError as err:  # the sync debug mode's error names the call
            row.update(synced_at_step=i, error=str(err).splitlines()[0][:200],
                       where=where_from(err))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        if row["synced_at_step"] is None:
            seconds = time.perf_counter() - start
            row["ladder_tokens_per_second"] = round(steps * 4096 / seconds)
        out.append(row)
        del trainer, xs
        torch.cuda.empty_cache()
    return out


def where_from(err: BaseException) -> str:
    """The innermost frame in raysae's package, and the innermost frame overall."""
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if Path(f.filename).resolve().is_relative_to(ROOT / "raysae")]

    def fmt(f) -> str:
        path = Path(f.filename).resolve()
        name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
        return f"{name}:{f.lineno} ({f.name}): {f.line}"

    inner = fmt(frames[-1]) if frames else "?"
    return f"{fmt(ours[-1])}; innermost {inner}" if ours else inner


# --- 3. the search --------------------------------------------------------------------------


class GpuSampler:
    """``nvidia-smi`` writing utilisation and memory every 500 ms into ``path``."""

    def __init__(self, path: Path):
        self.path, self.proc = path, None
        if shutil.which("nvidia-smi"):
            self.file = open(path, "w")  # noqa: SIM115  (closed in stop)
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits", "-lms", "500"],
                stdout=self.file, stderr=subprocess.DEVNULL)

    def stop(self) -> list[tuple[float, float]]:
        if self.proc is None:
            return []
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.file.close()
        samples = []
        for line in self.path.read_text().splitlines():
            try:
                util, mem = (float(v) for v in line.split(",")[:2])
            except ValueError:
                continue
            samples.append((util, mem))
        return samples


def search_command(args, model: Path | None, work: Path) -> list[str]:
    cmd = [sys.executable, "-m", "raysae", "search", "--corpus", "stdlib", "--address", "local",
           "--num-trials", "1", "--seeds", "0", "--baselines", "topk", "--no-report",
           "--name", "gpu_rehearsal", "--storage", str(work / "tune"),
           "--results", str(work / "results")]
    if args.cpu:
        cmd += ["--gpus-per-trial", "0", "--max-concurrent", "2",
                "--cache-tokens", str(args.cache_tokens or 16_384),
                "--total-tokens", str(args.total_tokens or 8_192),
                "--batch-size", "512", "--log-every", "4", "--eval-blocks", "2",
                "--feature-tokens", "2048"]
        if model is not None:
            cmd += ["--model", str(model), "--context-length", "32"]
    else:
        cmd += ["--preset", "pythia-70m", "--model", str(model),
                "--gpus-per-trial", "0.25", "--max-concurrent", "4",
                "--cache-tokens", str(args.cache_tokens or 1_048_576),
                "--total-tokens", str(args.total_tokens or 6_291_456),
                "--eval-blocks", "32", "--feature-tokens", "200000"]
    return cmd


def run_search(cmd: list[str], env: dict, log: Path, deadline: float) -> tuple[int, float]:
    """Run the CLI, its output into ``log``; the raysae lines and a heartbeat echoed. Past
    ``deadline`` (perf_counter) it is interrupted (SIGINT, then its process group killed)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1,
                                start_new_session=True)

        def pump() -> None:
            for line in proc.stdout:
                out.write(line)
                driver = not line.startswith(("(", "\x1b["))  # not a Ray worker's line
                if line.startswith("raysae") or (driver and ("Traceback" in line
                                                            or "Error" in line)):
                    say("  | " + line.rstrip()[:300])

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        beat = start
        while proc.poll() is None:
            time.sleep(1)
            now = time.perf_counter()
            if now - beat >= 30:
                beat = now
                say(f"  search running for {now - start:.0f} s")
            if now > deadline:
                say("  budget reached: interrupting the search (SIGINT)")
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                break
        reader.join(timeout=10)
    return proc.returncode, time.perf_counter() - start


# --- 4. the summary -------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def harvest_summary(cache_root: Path, out: Path) -> dict | None:
    for manifest in sorted((cache_root / "activations").glob("*/manifest.json")):
        m = json.loads(manifest.read_text())
        shutil.copy(manifest, out / "cache_manifest.json")
        seconds = float(m.get("build_seconds") or 0)
        return {"rows": m["n_tokens"], "d_in": m["d_in"], "dtype": m["dtype"],
                "build_seconds": seconds,
                "tokens_per_second": round(m["n_tokens"] / seconds) if seconds else None}
    return None


def trials_summary(results: Path, out: Path) -> list[dict]:
    import pandas as pd

    path = results / "trials.parquet"
    if not path.exists():
        return []
    shutil.copy(path, out / "trials.parquet")
    trials = pd.read_parquet(path)
    if "tune_trial_id" in trials:
        trials = trials.drop_duplicates("tune_trial_id")
    cols = ["stage", "label", "status", "tokens_seen", "train_tokens_per_second",
            "train_seconds", "eval_seconds", "setup_seconds"]
    rows = trials[[c for c in cols if c in trials]].to_dict("records")
    return [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}
            for r in rows]


def tune_results(storage: Path) -> list[dict]:
    """Without trials.parquet (a search stopped at the budget): each Tune trial's last
    reported row (result.json); a trial still training has only its live tokens/s."""
    rows = []
    for path in sorted(storage.glob("*/run_trial_*/result.json")):
        lines = path.read_text().strip().splitlines()
        if not lines:
            continue
        last = json.loads(lines[-1])
        rows.append({"stage": path.parent.parent.name.rsplit("_", 1)[-1],
                     "label": last.get("label"),
                     "status": "finished" if "train_seconds" in last else "stopped",
                     "tokens_seen": last.get("tokens_seen", 0),
                     "train_tokens_per_second": last.get("train_tokens_per_second",
                                                         last.get("tokens_per_second")),
                     **{k: last[k] for k in ("train_seconds", "eval_seconds", "setup_seconds")
                        if k in last}})
    if rows:
        say("no trials.parquet: the trials' own Tune results instead")
    return rows


def print_summary(summary: dict) -> None:
    say("=== summary ===")
    env = summary["environment"]
    say(f"machine: {env.get('gpu', 'no GPU')}; python {env['python']}, torch {env['torch']} "
        f"(CUDA {env['cuda']}), ray {env['ray']}, transformers {env['transformers']}, "
        f"transformer-lens {env['transformer-lens']}, {env['cpus']} CPUs")
    for p in env["requirement_problems"]:
        say(f"requirement not met: {p}")
    h = summary.get("harvest")
    say("harvest (cache build): " + (f"{h['rows']:,} rows (d_in {h['d_in']}, {h['dtype']}) in "
                                     f"{h['build_seconds']:.1f} s = {h['tokens_per_second']:,}"
                                     " tokens/s" if h else "no cache manifest found"))
    trials = summary.get("trials") or []
    say(f"trials under Tune ({len(trials)}):")
    say(f"  {'stage':<7}{'label':<22}{'status':<10}{'tokens':>10}{'train tok/s':>13}"
        f"{'train s':>9}{'eval s':>8}{'setup s':>9}")
    def num(t: dict, key: str, fmt: str) -> str:
        v = t.get(key)
        return "-" if v is None or v != v else format(v, fmt)

    for t in trials:
        say(f"  {t.get('stage', ''):<7}{str(t.get('label', ''))[:21]:<22}"
            f"{str(t.get('status', '')):<10}{num(t, 'tokens_seen', ',.0f'):>10}"
            f"{num(t, 'train_tokens_per_second', ',.0f'):>13}"
            f"{num(t, 'train_seconds', '.1f'):>9}{num(t, 'eval_seconds', '.1f'):>8}"
            f"{num(t, 'setup_seconds', '.1f'):>9}")
    g = summary.get("gpu_utilisation")
    say("GPU utilisation: " + (f"{g['samples']} samples, mean {g['mean']:.0f}%, p50 {g['p50']:.0f}%"
                               f", p90 {g['p90']:.0f}%, memory max {g['memory_max_mib']:.0f} MiB"
                               if g else summary.get("gpu_utilisation_note", "not sampled")))
    prov = summary.get("provenance") or {}
    say(f"stage wall seconds: {prov.get('stage_seconds')}")
    for stage, parts in (prov.get("core_seconds") or {}).items():
        say(f"  core-seconds {stage}: " + ", ".join(f"{k} {v}" for k, v in parts.items()))
    sync = summary.get("sync_check")
    if isinstance(sync, list):
        for r in sync:
            say(f"sync check {r['kind']}: " + (
                f"no synchronisation in {r['steps']} steps "
                f"({r['ladder_tokens_per_second']:,} ladder tokens/s)"
                if r["synced_at_step"] is None else
                f"SYNCHRONISED at step {r['synced_at_step']} at {r['where']}"))
    else:
        say(f"sync check: {sync}")
    say(f"search: exit {summary.get('search_exit')} after {summary.get('search_seconds')} s; "
        f"whole rehearsal {time.perf_counter() - START:.0f} s")


# --- main -----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_out = os.environ.get("OUT") or "gpu_rehearsal_out"
    parser.add_argument("--out", type=Path, default=Path(default_out),
                        help="results folder (default: $OUT, else ./gpu_rehearsal_out)")
    parser.add_argument("--cpu", action="store_true",
                        help="CPU at a small shape (automatic without CUDA)")
    parser.add_argument("--local-model", choices=("tiny", "default"), default="tiny",
                        help="with --cpu: LocalModelSpec.tiny() (seconds) or the project's "
                             "default local model (no --model; ~3 min to build once)")
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help="the whole rehearsal's time; the search is stopped so that the "
                             "summary still fits (default: 330; --cpu: 1800)")
    parser.add_argument("--cache-tokens", type=int, default=None,
                        help="activation rows harvested (GPU default 1048576)")
    parser.add_argument("--total-tokens", type=int, default=None,
                        help="training tokens per SAE (GPU default 6291456)")
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch folder (checkpoint, cache, Tune storage; default: temp)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    try:
        rehearse(args, summary)
    except BaseException as err:  # noqa: BLE001  (whatever stops it, the files are written)
        summary["error"] = "".join(traceback.format_exception(err))
        say(f"FAILED: {type(err).__name__}: {err}")
    finally:
        summary["seconds"] = round(time.perf_counter() - START, 1)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        say(f"wrote {args.out}: summary.json, rehearsal.log, search_stdout.log, ...")
        (args.out / "rehearsal.log").write_text("\n".join(LOG) + "\n")
        for folder in UNPACKED:
            shutil.rmtree(folder, ignore_errors=True)
    ok = "error" not in summary and summary.get("search_exit") == 0 and bool(summary["trials"])
    if args.work is None and ok and summary.get("work"):
        shutil.rmtree(summary["work"], ignore_errors=True)
    return 0 if ok else 1


def rehearse(args: argparse.Namespace, summary: dict) -> None:
    site = ensure_site(ARCHIVE)
    import torch  # after the site: nothing raysae needs is imported before it

    if not torch.cuda.is_available() and not args.cpu:
        say("no CUDA device: running the CPU rehearsal (--cpu)")
        args.cpu = True
    budget = args.budget_seconds or (1800.0 if args.cpu else 330.0)
    work = args.work or Path(tempfile.mkdtemp(prefix="raysae-gpu-rehearsal-"))
    work.mkdir(parents=True, exist_ok=True)
    cache_root = work / "raysae-cache"
    env = {**os.environ, "RAYSAE_CACHE_DIR": str(cache_root), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_ADDRESS": "",
           "RAYSAE_RAY_ADDRESS": "", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    os.environ.update({k: env[k] for k in ("RAYSAE_CACHE_DIR", "HF_HUB_OFFLINE",
                                           "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM")})
    summary.update(mode="cpu" if args.cpu else "gpu", work=str(work),
                   environment=environment(site))
    e = summary["environment"]
    say(f"mode {summary['mode']}: python {e['python']}, torch {e['torch']}, "
        f"{e.get('gpu', 'no GPU')}, ray {e['ray']}, work folder {work}")
    for p in e["requirement_problems"]:
        say(f"  requirement not met: {p}")

    # 1. the model and the corpus
    model: Path | None = None
    if args.cpu:
        if args.local_model == "tiny":
            from raysae.lm.local_model import LocalModelSpec, build_local_model

            model = build_local_model(LocalModelSpec.tiny(), progress=False)
            say(f"model: the tiny local model at {model}")
        else:
            say("model: the project's default local model (the CLI builds it if absent)")
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from pythia_checkpoint import build_pythia70m_checkpoint

        model = build_pythia70m_checkpoint(work / "pythia-70m-random")
        say(f"model: random-weight Pythia-70M-deduped checkpoint at {model}")
    say("corpus: stdlib (the Python standard library's sources, offline)")

    # 2. the sync check (quick; before the search, whose time is capped)
    if args.cpu:
        summary["sync_check"] = "skipped: no CUDA (the sync debug mode is CUDA's)"
    else:
        say("sync check: 100 ladder steps per kind under set_sync_debug_mode('error') ...")
        try:
            summary["sync_check"] = sync_check()
        except Exception as err:  # report and go on to the search
            summary["sync_check"] = f"failed: {type(err).__name__}: {err}"
        say(f"  {summary['sync_check']}")

    # 3. the search, nvidia-smi sampling beside it
    cmd = search_command(args, model, work)
    (args.out / "search_command.txt").write_text(" ".join(cmd) + "\n")
    say("search: " + " ".join(cmd[1:]))
    sampler = None if args.cpu else GpuSampler(args.out / "nvidia_smi.csv")
    try:
        code, seconds = run_search(cmd, env, args.out / "search_stdout.log",
                                   deadline=START + budget - 30)
    finally:
        samples = sampler.stop() if sampler else []
    summary.update(search_exit=code, search_seconds=round(seconds, 1), search_command=cmd)
    if samples:
        util = [u for u, _ in samples]
        summary["gpu_utilisation"] = {
            "samples": len(util), "mean": sum(util) / len(util), "p50": quantile(util, 0.5),
            "p90": quantile(util, 0.9), "memory_max_mib": max(m for _, m in samples)}
    else:
        summary["gpu_utilisation_note"] = ("skipped: CPU rehearsal" if args.cpu else
                                           "no samples (nvidia-smi missing or silent)")

    # 4. the summary
    results = work / "results"
    summary["harvest"] = harvest_summary(cache_root, args.out)
    summary["trials"] = trials_summary(results, args.out) or tune_results(work / "tune")
    search_json = results / "search.json"
    if search_json.exists():
        shutil.copy(search_json, args.out / "search.json")
        summary["provenance"] = json.loads(search_json.read_text()).get("provenance")
    print_summary(summary)


if __name__ == "__main__":
    sys.exit(main())
