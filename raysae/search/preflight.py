"""Checks of the main job's flags, run before Ray starts and before anything is written.

Bad input must cost seconds, not a search: every check here raises a ValueError whose one-line
message names the flag and the fix, and ``raysae.search.job.main`` turns it into ``error: ...`` on
stderr and exit status 2. The checks run in three rounds: the flags alone (numbers, penalty
ranges from the penalty registry, paths that must exist, the text data's first rows), the
folders the job will write (writable, not full; nothing is created), then the model (hook,
d_sae, a given cache's settings). Only after all three does the job create a folder.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

MIN_FREE_BYTES = 100 * 1024**2
"""A results/storage/cache folder with less free space than this is refused up front."""
_PATH_EXTS = (".parquet", ".json", ".jsonl", ".txt", ".py", ".md")
_TRUE = {"1", "ON", "YES", "TRUE"}


def _bad(flag: str, value, allowed: str, fix: str) -> ValueError:
    return ValueError(f"{flag} {value} is invalid: {allowed}; {fix}")


def _num(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def check_flags(args, preset, sweep: bool) -> None:
    """Everything that needs neither the model nor a folder write (see the module doc)."""
    for name in ("num_trials", "total_tokens", "cache_tokens", "max_concurrent",
                 "context_length", "batch_size"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise _bad(flag, value, "must be an integer >= 1", f"pass a positive {flag}")
    if args.context_length is not None and args.context_length < 2:
        raise _bad("--context-length", args.context_length, "must be >= 2",
                   "pass --context-length 2 or more")
    if args.expansion is not None and args.expansion < 1:
        raise _bad("--expansion", args.expansion, "d_sae = expansion * d_in must be a "
                   "positive integer", "pass a whole number >= 1, e.g. --expansion 4")
    if not (_num(args.cpus_per_trial) and args.cpus_per_trial > 0):
        raise _bad("--cpus-per-trial", args.cpus_per_trial, "must be > 0",
                   "pass a CPU share such as 1 or 0.25")
    if args.gpus_per_trial is not None and not (_num(args.gpus_per_trial)
                                                and args.gpus_per_trial >= 0):
        raise _bad("--gpus-per-trial", args.gpus_per_trial, "must be >= 0",
                   "pass a GPU share such as 0.25")
    for t in args.targets or ():
        if not (_num(t) and t > 0):
            raise _bad("--targets", f"{t:g}", "a target L0 must be > 0 (and <= d_sae)",
                       "pass positive target L0 values")
    if args.cache and args.live:
        raise ValueError("--cache and --live exclude each other: --live streams activations "
                         "instead of reading a cache; drop one of them")
    if sweep:
        _check_sweep(args)
    else:
        _check_search(args)
    _check_ranges(args)
    tokens = args.total_tokens or preset.total_tokens
    if tokens < preset.batch_size:
        raise _bad("--total-tokens", tokens, f"smaller than one batch (--batch-size "
                   f"{preset.batch_size})", "raise --total-tokens or lower --batch-size")


def _check_search(args) -> None:
    if not (_num(args.beta) and args.beta >= 0):
        raise _bad("--beta", args.beta, "must be a number >= 0", "pass e.g. --beta 1")
    if args.objective == "pareto" and args.lambda_mode == "control":
        raise ValueError("--objective pareto needs --lambda-mode search: lambda must vary "
                         "to trace a frontier; add --lambda-mode search")


def _check_sweep(args) -> None:
    for lam in args.lambdas or ():
        if not (_num(lam) and lam >= 0):
            raise _bad("--lambdas", f"{lam:g}", "lambda must be a number >= 0",
                       "pass non-negative penalty coefficients")
    param = _lp_param("p")
    for p in args.exponents:
        if not param.contains(p):
            raise _bad("--exponents", f"{p:g}", f"the exponent p of penalty 'lp' must be in "
                       f"{param.range_text()}", "pass exponents such as 1 0.5 0.25")


def _lp_param(name: str):
    """The registry's declaration of one parameter of the 'lp' penalty (its allowed range)."""
    from raysae.core.penalties import get_penalty

    return {p.name: p for p in get_penalty("lp").params}[name]


def _check_ranges(args) -> None:
    """--p-range / --s-range against the penalty registry; --lam-range > 0 (log-uniform)."""
    for flag, name in (("--p-range", "p"), ("--s-range", "s")):
        pair = getattr(args, flag[2:].replace("-", "_"), None)
        if pair is None:
            continue
        param = _lp_param(name)
        for end, value in zip(("LOW", "HIGH"), pair):
            if not param.contains(value):
                raise _bad(flag, f"{end} = {value:g}", f"{name} of penalty 'lp' must be in "
                           f"{param.range_text()}", f"pass {flag} LOW HIGH inside that range")
        if pair[0] > pair[1]:
            raise _bad(flag, f"{pair[0]:g} {pair[1]:g}", "LOW is above HIGH",
                       f"pass {flag} LOW HIGH with LOW <= HIGH")
    pair = getattr(args, "lam_range", None)
    if pair is not None:
        if not all(_num(v) and v > 0 for v in pair):
            raise _bad("--lam-range", f"{pair[0]:g} {pair[1]:g}", "lambda is searched on a "
                       "log scale, so both ends must be > 0", "pass --lam-range LOW HIGH with "
                       "0 < LOW <= HIGH")
        if pair[0] > pair[1]:
            raise _bad("--lam-range", f"{pair[0]:g} {pair[1]:g}", "LOW is above HIGH",
                       "pass --lam-range LOW HIGH with LOW <= HIGH")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def _path_like(name: str) -> bool:
    return (name.startswith((".", "/", "~")) or name.count("/") > 1
            or name.lower().endswith(_PATH_EXTS))


def check_model_name(model: str | None) -> None:
    """A local folder must be a checkpoint; a hub name must be reachable or cached."""
    if model is None or model in ("local", "local-tiny"):
        return
    path = Path(os.path.expanduser(model))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {model} is not a model checkpoint folder (no config.json)"
                             "; give a Hugging Face checkpoint folder or a hub name")
        return
    if _path_like(model):
        raise ValueError(f"--model {model}: no such folder; give an existing checkpoint folder "
                         "(e.g. one made by `raysae build-model`) or a hub name")
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "config.json"), str):
            raise ValueError(f"--model {model} is neither a local folder nor a cached hub model,"
                             " and HF_HUB_OFFLINE is set; give a checkpoint folder (`raysae "
                             "build-model`), omit --model for the local model, or go online")


def check_corpus(source: str, text_column: str) -> None:
    """The text data exists, has the text column and is not empty (train and held-out)."""
    from raysae.lm import corpus

    if source == corpus.STDLIB:
        return
    if not corpus._is_local(source) and _path_like(source):
        raise ValueError(f"--corpus {source}: no such file or folder; give 'stdlib', local "
                         "text/parquet/json files, or a hub dataset name")
    if corpus._is_local(source):
        try:
            files = corpus.corpus_files(source)
        except ValueError as err:
            if Path(source).is_dir():
                raise ValueError(f"--corpus {source} is an empty folder (no files); give "
                                 "a folder of text/parquet/json files") from None
            raise ValueError(f"--corpus {source}: {err}") from None
        if all(_empty_file(f) for f in files):
            raise ValueError(f"--corpus {source} is empty (no rows); give a dataset with text")
    for split in ("train", "heldout"):
        first = _first_text(source, text_column, split)
        if first is None:
            what = "empty" if split == "train" else "empty in its held-out split (used for CE)"
            raise ValueError(f"--corpus {source} is {what}; give a dataset with more text")


def _empty_file(path: Path) -> bool:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows == 0
    size = path.stat().st_size
    return size == 0 or (size < 4096 and not path.read_bytes().strip())


def _first_text(source: str, text_column: str, split: str) -> str | None:
    from raysae.lm import corpus

    try:
        return next(corpus.iter_texts(source, text_column=text_column, split=split), None)
    except ValueError as err:
        if "text_column" in str(err):
            found = re.search(r"columns (\[[^\]]*\])", str(err))
            cols = found.group(1) if found else "see the data"
            raise ValueError(f"--text-column {text_column} is not a column of --corpus {source}"
                             f" (columns: {cols}); pass --text-column with one of them") from None
        raise ValueError(f"--corpus {source}: {err}") from None
    except Exception as err:  # datasets/pyarrow raise many types for unreadable data
        raise ValueError(f"--corpus {source} cannot be read ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:200]}); give 'stdlib', local files "
                         "or a reachable hub dataset") from None


def check_cache_flag(cache: str) -> dict:
    """The manifest of a --cache folder (its settings are compared once the model is known)."""
    from raysae.activations.cache import MANIFEST, load_manifest

    if not (Path(cache) / MANIFEST).is_file():
        raise ValueError(f"--cache {cache} holds no {MANIFEST}: not a finished activation cache;"
                         " give a folder made by `raysae cache`, or omit --cache to build one")
    try:
        return load_manifest(cache)
    except ValueError as err:  # unreadable JSON
        raise ValueError(f"--cache {cache}: {err}; omit --cache to build one") from None


def check_cache_matches(cache: str, manifest: dict, model: str, hook: str,
                        context_length: int, d_in: int) -> None:
    """Refuse a --cache built for another model, hook, context length or width."""
    from raysae.activations.source import model_fingerprint

    have = manifest.get("settings", {})
    want = {"model": (model_fingerprint(model), "--model"), "hook": (hook, "--hook"),
            "context_length": (context_length, "--context-length")}
    diff = [f"{key} {have.get(key)!r} (not {value!r} from {flag})"
            for key, (value, flag) in want.items() if have.get(key) != value]
    if not diff and manifest.get("d_in") != d_in:
        diff = [f"d_in {manifest.get('d_in')} (the model's width is {d_in})"]
    if diff:
        raise ValueError(f"--cache {cache} was built for {', '.join(diff)}; pass the matching "
                         "flags, or omit --cache to build a cache for these settings")


def check_batch(batch_size: int, cache_tokens: int, cache_flag: str) -> None:
    if batch_size > cache_tokens:
        raise ValueError(f"--batch-size {batch_size} is larger than the activation cache "
                         f"({cache_flag}: {cache_tokens} tokens); lower --batch-size or use a "
                         "bigger cache")


def check_targets(targets, d_in: int, expansion: int) -> None:
    d_sae = d_in * expansion
    for t in targets:
        if t > d_sae:
            raise _bad("--targets", f"{t:g}", f"a target L0 must be <= d_sae = {d_sae} "
                       f"(--expansion {expansion} x d_in {d_in})",
                       "lower the target or raise --expansion")


def check_hook(lm, hook: str, model: str) -> None:
    """The hook exists on the model; else the error lists close matches."""
    from raysae.lm.models import hook_names

    names = hook_names(lm)
    if hook in names:
        return
    close = difflib.get_close_matches(hook, names, n=3, cutoff=0.6)
    resid = [n for n in names if n.endswith("hook_resid_post")]
    span = f" (residual stream: {resid[0]} .. {resid[-1]})" if resid else ""
    raise ValueError(f"--hook {hook} is not a hook of model {model}; close matches: "
                     f"{close or 'none'}; pass --hook with a valid name{span}")


def preflight_writable(folder: Path, *, flag: str = "--results",
                       min_free_bytes: int = MIN_FREE_BYTES) -> None:
    """Fail before any work when ``folder`` cannot be created/written or its disk is nearly
    full. Creates nothing: the write test goes to the nearest existing ancestor and is removed."""
    folder = Path(folder).expanduser().absolute()
    base = folder
    while not base.exists() and base != base.parent:
        base = base.parent
    what = f"{flag} folder {folder}"
    if not base.is_dir():
        raise ValueError(f"{what} cannot be created: {base} is a file, not a folder; "
                         f"pass {flag} a writable folder")
    try:
        with tempfile.NamedTemporaryFile(dir=base, prefix=".raysae-write-test-") as f:
            f.write(b"x" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise ValueError(f"{what} is not writable ({exc.strerror} in {base}); pass {flag} a "
                         "writable folder") from None
    free = shutil.disk_usage(base).free
    if free < min_free_bytes:
        raise ValueError(f"{what} has only {free / 1024**2:.1f} MiB free (need "
                         f"{min_free_bytes // 1024**2} MiB); free space or pass {flag} "
                         "elsewhere")


def make_dirs(folder: Path) -> list[Path]:
    """Create ``folder``; return the folders this created (outermost first), for cleanup."""
    folder = Path(folder).absolute()
    made = [p for p in [folder, *folder.parents] if not p.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return made


def remove_if_empty(made: list[Path]) -> None:
    """Undo ``make_dirs`` after a failure, keeping any folder something was written into."""
    for path in reversed(made):
        try:
            path.rmdir()
        except OSError:
            return
