"""Pre-flight checks of what a config cannot check alone, run before Ray starts and before
anything is written: the model name, the corpus (exists, has the text column, not empty),
the folders the job will write (writable, not full; nothing is created), then the model
(hook, d_sae, a given cache's settings). Every check raises a ValueError whose one-line
message names the flag and the fix; the CLI prints it as one line with exit status 2.
Numbers and ranges are checked by the configs themselves (raysae.search.config).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.utils import (
    are_progress_bars_disabled,
    disable_progress_bars,
    enable_progress_bars,
)
from transformers import AutoConfig
from transformers.utils import logging as hf_logging

from raysae.activations.cache import MANIFEST, load_manifest
from raysae.activations.source import model_fingerprint
from raysae.core import config as core_config
from raysae.evaluation.spliced_ce import unproduced_metrics
from raysae.lm import corpus
from raysae.lm.local_model import default_model
from raysae.lm.models import check_hook, load_model
from raysae.lm.models import resolve_model as resolve_name
from raysae.settings import UserError

MIN_FREE_BYTES = 100 * 1024**2
"""A results/storage/cache folder with less free space than this is refused up front."""
_PATH_EXTS = (".parquet", ".json", ".jsonl", ".txt", ".py", ".md")
_TRUE = {"1", "ON", "YES", "TRUE"}


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
            raise UserError(f"--model {model} is not a model checkpoint folder (no config.json)"
                             "; give a Hugging Face checkpoint folder or a hub name")
        return
    if _path_like(model):
        raise UserError(f"--model {model}: no such folder; give an existing checkpoint folder "
                         "(e.g. one made by `raysae build-model`) or a hub name")
    if _offline() and not isinstance(try_to_load_from_cache(model, "config.json"), str):
        raise UserError(f"--model {model} is neither a local folder nor a cached hub model,"
                        " and HF_HUB_OFFLINE is set; give a checkpoint folder (`raysae "
                        "build-model`), omit --model for the local model, or go online")


def check_corpus(source: str, text_column: str) -> None:
    """The text data exists, has the text column and is not empty (train and held-out)."""
    if source == corpus.STDLIB:
        return
    if not corpus._is_local(source) and _path_like(source):
        raise UserError(f"--corpus {source}: no such file or folder; give 'stdlib', local "
                         "text/parquet/json files, or a hub dataset name")
    if corpus._is_local(source):
        try:
            files = corpus.corpus_files(source)
        except ValueError as err:
            if Path(source).is_dir():
                raise UserError(f"--corpus {source} is an empty folder (no files); give "
                                 "a folder of text/parquet/json files") from None
            raise UserError(f"--corpus {source}: {err}") from None
        if all(_empty_file(f) for f in files):
            raise UserError(f"--corpus {source} is empty (no rows); give a dataset with text")
    for split in ("train", "heldout"):
        first = _first_text(source, text_column, split)
        if first is None:
            what = "empty" if split == "train" else "empty in its held-out split (used for CE)"
            raise UserError(f"--corpus {source} is {what}; give a dataset with more text")


def _empty_file(path: Path) -> bool:
    if path.suffix.lower() == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows == 0
    size = path.stat().st_size
    return size == 0 or (size < 4096 and not path.read_bytes().strip())


def _first_text(source: str, text_column: str, split: str) -> str | None:
    try:
        return next(corpus.iter_texts(source, text_column=text_column, split=split), None)
    except UnicodeDecodeError as err:
        raise UserError(f"--corpus {source} is not a text file (not UTF-8: byte "
                         f"0x{err.object[err.start]:02x} at offset {err.start}); give UTF-8 "
                         "text, parquet or json files, or 'stdlib'") from None
    except ValueError as err:
        if "text_column" in str(err):
            found = re.search(r"columns (\[[^\]]*\])", str(err))
            cols = found.group(1) if found else "see the data"
            raise UserError(f"--text-column {text_column} is not a column of --corpus {source}"
                             f" (columns: {cols}); pass --text-column with one of them") from None
        raise UserError(f"--corpus {source}: {err}") from None
    except Exception as err:  # datasets/pyarrow raise many types for unreadable data
        raise UserError(f"--corpus {source} cannot be read ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:200]}); give 'stdlib', local files "
                         "or a reachable hub dataset") from None


def check_cache_flag(cache: str) -> dict:
    """The manifest of a --cache folder (its settings are compared once the model is known)."""
    if not (Path(cache) / MANIFEST).is_file():
        raise UserError(f"--cache {cache} holds no {MANIFEST}: not a finished activation cache;"
                         " give a folder made by `raysae cache`, or omit --cache to build one")
    try:
        return load_manifest(cache)
    except ValueError as err:  # unreadable JSON
        raise UserError(f"--cache {cache}: {err}; omit --cache to build one") from None


def check_cache_matches(cache: str, manifest: dict, model: str, hook: str,
                        context_length: int, d_in: int) -> None:
    """Refuse a --cache built for another model, hook, context length or width."""
    have = manifest.get("settings", {})
    want = {"model": (model_fingerprint(model), "--model"), "hook": (hook, "--hook"),
            "context_length": (context_length, "--context-length")}
    diff = [f"{key} {have.get(key)!r} (not {value!r} from {flag})"
            for key, (value, flag) in want.items() if have.get(key) != value]
    if not diff and manifest.get("d_in") != d_in:
        diff = [f"d_in {manifest.get('d_in')} (the model's width is {d_in})"]
    if diff:
        raise UserError(f"--cache {cache} was built for {', '.join(diff)}; pass the matching "
                         "flags, or omit --cache to build a cache for these settings")


def check_batch(batch_size: int, cache_tokens: int, cache_flag: str) -> None:
    if batch_size > cache_tokens:
        raise UserError(f"--batch-size {batch_size} is larger than the activation cache "
                         f"({cache_flag}: {cache_tokens} tokens); lower --batch-size or use a "
                         "bigger cache")


def check_metrics() -> None:
    """Every registered metric is one the trials produce (the evaluator's or the feature
    statistics'); else the job refuses to start, naming it."""
    missing = unproduced_metrics()
    if missing:
        raise UserError(f"metric(s) {missing} are registered (raysae.core.metrics) but no "
                        "trial produces them: neither the evaluator nor the feature "
                        "statistics compute them; give each a per_token function "
                        "(@register_metric) or remove it")


def check_targets(targets, d_in: int, expansion: int) -> None:
    """The ladder against the SAE's width, which the model's hook width decides."""
    core_config.check_targets(targets, d_in * expansion, f"d_sae is --expansion {expansion} "
                              f"x d_in {d_in}: lower the target or raise --expansion")


def resolve_model(name: str | None, hook: str) -> tuple[str, int]:
    """The model (built locally when none is named) and its hook width, hook checked."""
    model = name or str(default_model(progress=True))
    try:
        with _no_progress_bars():  # a refused input's stderr is its one error line
            lm = load_model(model, device="cpu")
    except (OSError, ValueError) as err:
        raise UserError(f"--model {model}: {' '.join(str(err).split())}") from None
    check_hook(lm, hook, model)
    return model, int(lm.cfg.d_model)


def model_max_positions(model: str) -> int | None:
    """The model's maximum sequence length from its config (None when it names none)."""
    name = os.path.expanduser(resolve_name(model))
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context_length(context_length: int, model: str) -> None:
    """--context-length within the model's positions (else the cache build dies late)."""
    limit = model_max_positions(model)
    if limit is not None and context_length > limit:
        raise UserError(f"--context-length {context_length} is larger than the model's "
                         f"maximum of {limit} positions ({model}); pass --context-length "
                         f"{limit} or less")


class _no_progress_bars:
    """Silence transformers' and huggingface_hub's progress bars (e.g. "Loading weights")."""

    def __enter__(self):
        self._hub = are_progress_bars_disabled()
        self._tf = hf_logging.is_progress_bar_enabled()
        disable_progress_bars()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        if not self._hub:
            enable_progress_bars()
        if self._tf:
            hf_logging.enable_progress_bar()
        return False


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
        raise UserError(f"{what} cannot be created: {base} is a file, not a folder; "
                         f"pass {flag} a writable folder")
    try:
        with tempfile.NamedTemporaryFile(dir=base, prefix=".raysae-write-test-") as f:
            f.write(b"x" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise UserError(f"{what} is not writable ({exc.strerror} in {base}); pass {flag} a "
                         "writable folder") from None
    free = shutil.disk_usage(base).free
    if free < min_free_bytes:
        raise UserError(f"{what} has only {free / 1024**2:.1f} MiB free (need "
                         f"{min_free_bytes // 1024**2} MiB); free space or pass {flag} "
                         "elsewhere")


def make_dirs(folder: Path) -> list[Path]:
    """Create ``folder``; return the folders this created (outermost first), for cleanup."""
    folder = Path(folder).absolute()
    made = [p for p in [folder, *folder.parents] if not p.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return made


def remove_if_empty(made: list[Path]) -> None:
    """Undo ``make_dirs`` (one call or several) after a failure, deepest folder first,
    keeping any folder something was written into."""
    for path in sorted(made, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            path.rmdir()
