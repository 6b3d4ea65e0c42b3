"""Pack what raysae needs on the lent GPU machine that its image lacks (issue #38).

    python benchmarks/pack_gpu_site.py [--wheels DIR] [--limit-mib 60] [--xz-preset 9]

Run it HERE (PyPI is reachable from this machine; nothing is from the GPU machine). It

1. walks the installed distributions' metadata (importlib.metadata) from raysae's own
   requirements (pyproject.toml [project.dependencies], extras included), with the markers
   evaluated for CPython 3.12 on Linux x86_64, and stops at every distribution the GPU
   image already has (``IMAGE``: its dependencies are the image's business);
2. leaves out ``NOT_SHIPPED`` (distributions raysae imports only with a flag the rehearsal
   does not pass) and the distributions only they pull in;
3. downloads a cp312 manylinux x86_64 wheel (or a pure-Python one) of each at the version
   pinned in constraints.txt, else the one installed in this venv, into ``--wheels`` (kept
   between runs: a rerun downloads nothing); a distribution with only an sdist on PyPI
   (transformers-stream-generator) is built into a wheel here and shipped if pure Python;
4. unpacks each wheel into a temporary site folder (wheels are zip files: this venv's
   Python 3.11 pip would refuse cp312 wheels), keeping the files' mode bits (Ray's raylet
   and gcs_server are executables), and deletes what raysae never uses (``prune``);
5. writes ``.gpu_site.tar.xz`` at the repository root (one folder, ``gpu_site/``, with
   ``gpu_site/gpu_site.json``: what it holds and what was left out, for the rehearsal) and
   ``.gpu_site.json`` beside it (the list, sizes, total, date), prints a table, and exits 1
   when the archive exceeds ``--limit-mib`` (60 MiB: the run tool carries at most 64 MiB,
   the working tree included).

benchmarks/gpu_rehearsal.py unpacks the archive on the GPU machine. The run tool call
carries it as an ignored path: ``carry: [".gpu_site.tar.xz"]``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT / ".gpu_site.tar.xz"
REPORT = ROOT / ".gpu_site.json"
SITE_DIR = "gpu_site"
"""The archive's one top-level folder."""

IMAGE_DATE = "2026-12-06"
IMAGE_LIST = """
absl-py accelerate aiohttp aiosignal attrs certifi charset-normalizer click cloudpickle
contourpy cycler einops filelock fonttools frozenlist fsspec grpcio h11 h5py hf-xet httpcore
httpx huggingface-hub idna jinja2 jaxtyping joblib kiwisolver markdown markdown-it-py markupsafe
matplotlib mdurl msgpack multidict networkx numpy packaging pandas pillow pip pluggy
prometheus-client propcache protobuf psutil pyarrow pygments pyparsing python-dateutil pyyaml
regex requests rich safetensors scipy sentencepiece setuptools six sortedcontainers sympy
tensorboard tensorboard-data-server tokenizers torch tqdm transformers triton typer
typing-extensions urllib3 wadler-lindig werkzeug wheel wrapt xxhash yarl zipp
"""
IMAGE = frozenset(canonicalize_name(n) for n in IMAGE_LIST.split())
"""The lent GPU machine's distributions as of ``IMAGE_DATE`` (issue #38: Python 3.12,
PyTorch 2.11 with CUDA 13). Frozen: the image's versions are unknown here, so
gpu_rehearsal.py checks the shipped distributions' requirements against what it finds."""

NOT_SHIPPED = {
    "wandb": "transformer-lens requires it, raysae imports it only with --wandb "
             "(raysae.search.tracking); 62 MB unpacked",
}
"""Required on paper, never imported by the rehearsal: left out with what only they pull in."""

TARGET_ENV = {
    "python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
    "implementation_version": "3.12.3", "platform_python_implementation": "CPython",
    "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
    "os_name": "posix", "platform_release": "", "platform_version": "",
}
"""Marker environment of the GPU machine's interpreter."""

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")

PRUNE_DIRS = ("ray/jars", "ray/rllib", "ray/serve", "ray/llm")
"""Ray's Java workers, RLlib, Serve and Ray LLM: raysae uses Core, Tune and Data only."""
DASHBOARD_BUILD = "ray/dashboard/client/build"
"""The dashboard's web client: the dashboard refuses to start without the folder, so it is
emptied (index.html kept), not removed; nobody opens the GPU machine's dashboard."""


# --- what is needed (pure: testable without metadata or network) ---------------------------


def missing_distributions(needed: Iterable[str], image: Iterable[str] = IMAGE,
                          not_shipped: Iterable[str] = ()) -> set[str]:
    """The canonical names in ``needed`` that neither the image has nor are left out."""
    have = {canonicalize_name(n) for n in image} | {canonicalize_name(n) for n in not_shipped}
    return {canonicalize_name(n) for n in needed} - have


def needed_closure(roots: Iterable[str], requires: Callable[[str], list[str] | None],
                   stop: Iterable[str] = (), env: dict | None = None) -> dict[str, set[str]]:
    """Every distribution reachable from the requirement strings ``roots``: canonical name ->
    the distributions that require it ('' for a root). ``requires(name)`` gives a
    distribution's requirement strings (None: not installed; it is still listed). Names in
    ``stop`` are listed but not descended into. Extras are followed: ``ray[tune]`` adds the
    requirements whose marker holds for ``extra == "tune"``."""
    env = {**TARGET_ENV, **(env or {})}
    stop = {canonicalize_name(n) for n in stop}
    extras: dict[str, set[str]] = {}
    parents: dict[str, set[str]] = {}
    todo = [(Requirement(r), "") for r in roots]
    while todo:
        req, parent = todo.pop()
        root_skipped = parent == "" and req.marker is not None
        if root_skipped and not req.marker.evaluate({**env, "extra": ""}):
            continue
        name = canonicalize_name(req.name)
        parents.setdefault(name, set()).add(parent)
        new = set(req.extras) - extras.get(name, set())
        if name in extras and not new:
            continue
        extras[name] = extras.get(name, set()) | set(req.extras)
        if name in stop:
            continue
        for text in requires(name) or []:
            dep = Requirement(text)
            if dep.marker is None or any(dep.marker.evaluate({**env, "extra": e})
                                         for e in ("", *sorted(extras[name]))):
                todo.append((dep, name))
    return parents


def drop_only_through(parents: dict[str, set[str]], left_out: Iterable[str]) -> set[str]:
    """The distributions that are needed only through ``left_out`` ones (those included)."""
    gone = {canonicalize_name(n) for n in left_out} & set(parents)
    changed = True
    while changed:
        changed = False
        for name, by in parents.items():
            if name not in gone and "" not in by and by <= gone:
                gone.add(name)
                changed = True
    return gone


# --- this machine's metadata and pins --------------------------------------------------------


def project_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    with open(pyproject, "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def installed_requires(name: str) -> list[str] | None:
    try:
        return md.distribution(name).requires or []
    except md.PackageNotFoundError:
        return None


def pins(constraints: Path = ROOT / "constraints.txt") -> dict[str, str]:
    out = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            req = Requirement(line)
            out[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    return out


def version_of(name: str, pinned: dict[str, str]) -> tuple[str | None, str]:
    """(version, where from): constraints.txt's pin, else this venv's (local tag dropped)."""
    try:
        installed = md.version(name).split("+")[0]
    except md.PackageNotFoundError:
        installed = None
    if name in pinned:
        note = "" if installed in (None, pinned[name]) else f" (venv has {installed})"
        return pinned[name], "constraints.txt" + note
    return installed, "venv" if installed else "not installed here"


# --- wheels ---------------------------------------------------------------------------------


def wheel_fits(filename: str) -> bool:
    """A wheel the GPU machine's CPython 3.12 on manylinux x86_64 can install: a tag whose
    platform is ``any`` or manylinux x86_64, and whose interpreter and ABI are CPython 3.12's,
    the stable ABI of an earlier CPython 3, or pure Python 3."""
    _, _, _, tags = parse_wheel_filename(filename)

    def ok(t) -> bool:
        platform = t.platform == "any" or (t.platform.startswith("manylinux")
                                           and t.platform.endswith("x86_64"))
        if t.abi == "abi3":
            py = t.interpreter.startswith("cp3") and int(t.interpreter[3:] or 0) <= 12
        else:
            py = (t.interpreter, t.abi) in {("cp312", "cp312"), ("py3", "none"),
                                            ("py312", "none"), ("cp312", "none")}
        return platform and py

    return any(ok(t) for t in tags)


def find_wheel(folder: Path, name: str, version: str) -> Path | None:
    for path in sorted(folder.glob("*.whl")):
        wname, wver, _, _ = parse_wheel_filename(path.name)
        if wname == name and str(wver) == version and wheel_fits(path.name):
            return path
    return None


def pip_download(specs: list[str], folder: Path, platform: bool = True) -> bool:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "--disable-pip-version-check",
           "-q", "-d", str(folder)]
    cmd += [a for p in PLATFORMS for a in ("--platform", p)] if platform else ["--platform", "any"]
    return subprocess.run(cmd + specs, capture_output=True, text=True).returncode == 0


def download(wanted: dict[str, str], folder: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """name -> wheel path for every (name, version) in ``wanted``; failures name -> reason."""
    folder.mkdir(parents=True, exist_ok=True)
    absent = {n: v for n, v in wanted.items() if find_wheel(folder, n, v) is None}
    if absent:
        print(f"downloading {len(absent)} wheels into {folder} ...", flush=True)
        if not pip_download([f"{n}=={v}" for n, v in sorted(absent.items())], folder):
            for n, v in sorted(absent.items()):  # one at a time: which one fails
                if find_wheel(folder, n, v) is None and not pip_download([f"{n}=={v}"], folder):
                    pip_download([f"{n}=={v}"], folder, platform=False)
        for n, v in sorted(absent.items()):  # only a source distribution: pure Python?
            if find_wheel(folder, n, v) is None:
                print(f"  {n}=={v}: no wheel on PyPI, building one from its sdist", flush=True)
                subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                                "--disable-pip-version-check", "-w", str(folder), f"{n}=={v}"],
                               capture_output=True, text=True)
    found, failed = {}, {}
    for n, v in wanted.items():
        path = find_wheel(folder, n, v)
        if path is None:
            failed[n] = (f"no cp312 manylinux x86_64 or pure-Python wheel of {n}=={v} on PyPI, "
                         "and its sdist did not build a pure-Python one")
        else:
            found[n] = path
    return found, failed


def unpack_wheel(wheel: Path, site: Path) -> list[Path]:
    """Extract ``wheel`` into ``site`` as an installer would (``*.data/purelib`` and
    ``platlib`` merged into the site; its scripts, headers and data dropped), keeping mode
    bits. Returns the files written, relative to ``site``."""
    written = []
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            parts = Path(info.filename).parts
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            rel = Path(*parts)
            dest = site / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                dest.chmod(mode | stat.S_IRUSR | stat.S_IWUSR)
            written.append(rel)
    return written


def prune(site: Path) -> list[str]:
    """Delete what raysae never uses; returns what was removed (with sizes)."""
    removed = []

    def drop(path: Path) -> None:
        size = tree_size(path)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        removed.append(f"{path.relative_to(site)} ({size / 2**20:.1f} MiB)")

    for rel in PRUNE_DIRS:
        if (site / rel).exists():
            drop(site / rel)
    build = site / DASHBOARD_BUILD
    if build.is_dir():
        size = tree_size(build)
        for child in build.iterdir():
            if child.name not in ("index.html", "favicon.ico"):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        (build / "static").mkdir()
        removed.append(f"{DASHBOARD_BUILD}/* but index.html "
                       f"({(size - tree_size(build)) / 2**20:.1f} MiB)")
    tests = [p for p in site.rglob("tests") if p.is_dir()]
    for path in sorted(tests, key=lambda p: len(p.parts)):
        if path.exists() and not path.parent.name.endswith(".dist-info"):
            drop(path)
    pyc = [p for p in site.rglob("__pycache__") if p.is_dir()] + list(site.rglob("*.pyc"))
    for path in pyc:
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return removed


def tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


# --- main -----------------------------------------------------------------------------------


def mib(n: int | float) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    parser.add_argument("--wheels", type=Path, default=cache / "raysae-gpu-site-wheels",
                        help="where the downloaded wheels are kept (default: %(default)s)")
    parser.add_argument("--limit-mib", type=float, default=60.0,
                        help="fail when the archive is larger (default: %(default)s)")
    parser.add_argument("--xz-preset", type=int, default=9, help="xz level (default: 9)")
    parser.add_argument("--out", type=Path, default=ARCHIVE, help="archive path")
    args = parser.parse_args()
    report_path = args.out.with_suffix("").with_suffix(".json")

    parents = needed_closure(project_requirements(), installed_requires, stop=IMAGE)
    left_out = drop_only_through(parents, NOT_SHIPPED) - IMAGE
    names = sorted(missing_distributions(parents, IMAGE, left_out) - {"raysae"})
    pinned = pins()
    wanted, sources, notes = {}, {}, {}
    for name in names:
        version, source = version_of(name, pinned)
        if version is None:
            notes[name] = "not installed in this venv: no version to ship"
            continue
        wanted[name], sources[name] = version, source
    wheels, failed = download(wanted, args.wheels)
    notes.update(failed)

    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-site-") as tmp:
        site = Path(tmp) / SITE_DIR
        site.mkdir()
        files = {name: unpack_wheel(path, site) for name, path in sorted(wheels.items())}
        removed = prune(site)
        for name, written in files.items():
            size = sum((site / f).stat().st_size for f in written if (site / f).is_file())
            rows.append({"name": name, "version": wanted[name], "version_from": sources[name],
                         "wheel": wheels[name].name, "unpacked_bytes": size,
                         "needed_by": sorted(p or "raysae" for p in parents[name])})
        left = {n: NOT_SHIPPED.get(n, "needed only through a left-out distribution")
                for n in sorted(left_out)}
        shipped = {r["name"]: r["version"] for r in rows}
        (site / "gpu_site.json").write_text(json.dumps(  # read by gpu_rehearsal.py
            {"image_date": IMAGE_DATE, "distributions": shipped, "left_out": left}, indent=1))
        total_unpacked = tree_size(site)
        print(f"writing {args.out} (xz -{args.xz_preset}, {mib(total_unpacked)} unpacked) ...",
              flush=True)
        with tarfile.open(args.out, "w:xz", preset=args.xz_preset) as tar:
            tar.add(site, arcname=SITE_DIR)
    archive = args.out.stat().st_size
    fits = archive <= args.limit_mib * 2**20

    width = max(len(r["name"]) for r in rows) + 2
    print(f"\n{'distribution':<{width}}{'version':<14}{'unpacked':>12}  needed by")
    for r in sorted(rows, key=lambda r: -r["unpacked_bytes"]):
        print(f"{r['name']:<{width}}{r['version']:<14}{mib(r['unpacked_bytes']):>12}  "
              f"{', '.join(r['needed_by'])}")
    print(f"\n{len(rows)} distributions, {mib(total_unpacked)} unpacked; archive {args.out.name}"
          f" {mib(archive)} ({'under' if fits else 'OVER'} the {args.limit_mib:g} MiB limit)")
    print("pruned: " + "; ".join(removed))
    for name in sorted(left_out):
        why = NOT_SHIPPED.get(name, "needed only through " + ", ".join(
            sorted(p for p in parents[name] if p)))
        print(f"left out: {name}: {why}")
    for name, why in sorted(notes.items()):
        print(f"NOT SHIPPED (needed): {name}: {why}")
    cannot_fit = []
    if not fits:
        biggest = sorted(rows, key=lambda r: -r["unpacked_bytes"])
        cannot_fit = [r["name"] for r in biggest[:5]]
        print(f"does not fit: the archive is {mib(archive)}, over {args.limit_mib:g} MiB; "
              f"the largest distributions: {', '.join(cannot_fit)}")

    report = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "image_date": IMAGE_DATE, "target": "CPython 3.12, manylinux x86_64",
        "archive": args.out.name, "archive_bytes": archive, "unpacked_bytes": total_unpacked,
        "limit_bytes": int(args.limit_mib * 2**20), "fits": fits, "xz_preset": args.xz_preset,
        "distributions": sorted(rows, key=lambda r: r["name"]),
        "left_out": left,
        "missing": notes, "cannot_fit": cannot_fit, "pruned": removed,
    }
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {report_path}")
    return 0 if fits and not notes else 1


if __name__ == "__main__":
    sys.exit(main())
