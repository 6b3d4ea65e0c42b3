"""Text -> fixed-length token blocks, through HF `datasets`.

Sources (the `source` argument of `token_blocks` / `iter_token_blocks`):
- ``"stdlib"``: the Python standard library's ``.py`` files, one document per file. Every
  machine has them, so this is the default offline corpus (and the text the local model
  trains on). Files are split deterministically by a hash of their relative path, so the
  ``"heldout"`` split never shares a token with the ``"train"`` split.
- a local path, a glob, or a list of paths: ``.parquet`` / ``.json(l)`` files (also
  compressed: ``.jsonl.zst``, ``.json.gz``, ...) are read as tables (``text_column`` names
  the text); other files as plain text, one document per file.
  Several text files are split by file; a single file or a table is split by row.
- anything else is a hub dataset name, streamed (``load_dataset(name, streaming=True)``).

A block is ``[BOS] + context_length - 1`` tokens of the packed stream (or ``context_length``
stream tokens when ``prepend_bos=False``); documents are joined with the EOS token.
"""

from __future__ import annotations

import glob
import os
import sysconfig
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from raysae.settings import UserError

STDLIB = "stdlib"
SPLITS = ("train", "heldout", "all")
HELD_OUT_FRACTION = 0.1
TABLE_EXTS = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}
_SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


STDLIB_ORDER = "crc32-of-path"
"""The stdlib's files are read in the order of a hash of their relative path: a fixed,
machine-independent shuffle, so any prefix of the stream (the activation cache's first
tokens, the held-out split's first blocks) samples every package. In alphabetical order the
cache's 500k tokens were the first sixth of the library (asyncio, collections, email, ...) and
the held-out blocks the first held-out files: the SAEs' held-out L0 ran 1.6-7.6% over the L0
they reached on their training stream. Part of the activation cache key."""


def stdlib_files() -> list[Path]:
    """The standard library's .py sources (test packages and installed packages excluded),
    in the fixed shuffled order of ``STDLIB_ORDER``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _SKIP_PARTS & set(p.relative_to(root).parts)]
    rel = {p: p.relative_to(root).as_posix() for p in files}
    # reversed bytes: not the hash that picks the held-out split (keeps the two independent)
    return sorted(files, key=lambda p: (zlib.crc32(rel[p].encode("utf-8")[::-1]), rel[p]))


def _in_heldout(key: str, held_out_fraction: float) -> bool:
    """Deterministic, machine-independent membership of the held-out split."""
    return (zlib.crc32(key.encode()) % 10_000) < held_out_fraction * 10_000


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}; pick one of them")


def split_files(
    files: Sequence[str | os.PathLike], split: str, held_out_fraction: float = HELD_OUT_FRACTION
) -> list[Path]:
    """Keep the files of one split, keyed by their path relative to the files' common folder."""
    _check_split(split)
    paths = [Path(f) for f in files]
    if split == "all" or not paths:
        return paths
    root = Path(os.path.commonpath([p.parent for p in paths]))
    want_heldout = split == "heldout"
    return [
        p
        for p in paths
        if _in_heldout(p.relative_to(root).as_posix(), held_out_fraction) == want_heldout
    ]


def corpus_files(source: str | os.PathLike | Sequence) -> list[Path]:
    """The local files behind a source ("stdlib", a path, a glob, a folder or a list)."""
    if isinstance(source, (str, os.PathLike)) and str(source) == STDLIB:
        return stdlib_files()
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*")
                            if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            files.append(path)
        else:
            files += [Path(p) for p in sorted(glob.glob(str(item))) if Path(p).is_file()]
    if not files:
        raise UserError(f"source {source!r}: no local files found; give a path, glob or folder")
    kinds = {_kind(f) for f in files}
    if len(kinds) > 1:
        raise UserError(f"source {source!r} mixes file kinds {sorted(kinds)}; give one kind")
    return files


COMPRESSED_EXTS = (".zst", ".gz", ".bz2", ".xz")
"""Compressed files are read through (datasets decompresses them; the Pile's shards on the
hub are .jsonl.zst, which needs the zstandard package)."""


def _kind(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in COMPRESSED_EXTS:
        suffixes.pop()
    return TABLE_EXTS.get(suffixes[-1] if suffixes else "", "text")


def _is_local(source) -> bool:
    if not isinstance(source, (str, os.PathLike)):
        return True
    s = str(source)
    return s == STDLIB or Path(s).exists() or any(ch in s for ch in "*?[")


def iter_texts(
    source, *, text_column: str = "text", split: str = "train",
    held_out_fraction: float = HELD_OUT_FRACTION, hf_split: str = "train",
) -> Iterator[str]:
    """Yield the documents of one split of a source (see the module doc)."""
    # on use: `datasets` (0.6 s to import) only for hub and table corpora
    from datasets import load_dataset

    _check_split(split)
    row_split = split
    if _is_local(source):
        files = corpus_files(source)
        kind = _kind(files[0])
        if kind == "text" and len(files) > 1:
            files, row_split = split_files(files, split, held_out_fraction), "all"
        if not files:
            raise UserError(f"source {source!r}: split {split!r} holds no files; add files")
        ds = load_dataset(kind, data_files=[str(f) for f in files], split="train", streaming=True,
                          **({"sample_by": "document"} if kind == "text" else {}))
    else:
        try:
            ds = load_dataset(str(source), split=hf_split, streaming=True)
        except (OSError, FileNotFoundError) as err:  # offline, unknown name, no access
            raise UserError(f"cannot open dataset {source!r} ({err}); give local files, "
                             "'stdlib', or a reachable hub dataset") from err
    for i, row in enumerate(ds):
        if text_column not in row:
            raise UserError(
                f"text_column={text_column!r} not in the data's columns {sorted(row)}; "
                "pass text_column=<one of them>"
            )
        if row_split != "all" and _in_heldout(f"row:{i}", held_out_fraction) != (
            row_split == "heldout"
        ):
            continue
        text = row[text_column]
        if text:
            yield text


def _tokenizer_of(tokenizer):
    """Accept an HF tokenizer or anything with a `.tokenizer` (a TransformerBridge)."""
    return getattr(tokenizer, "tokenizer", None) or tokenizer


def iter_token_blocks(
    source, tokenizer, context_length: int, *, text_column: str = "text",
    prepend_bos: bool = True, max_blocks: int | None = None, split: str = "train",
    held_out_fraction: float = HELD_OUT_FRACTION, hf_split: str = "train",
    docs_per_batch: int = 64,
) -> Iterator[np.ndarray]:
    """Yield int64 arrays [n, context_length] of packed token blocks, in corpus order."""
    tok = _tokenizer_of(tokenizer)
    if context_length < 2:
        raise ValueError(f"context_length={context_length} must be >= 2")
    bos = tok.bos_token_id
    eos = tok.eos_token_id if tok.eos_token_id is not None else bos
    if prepend_bos and bos is None:
        raise ValueError("tokenizer has no bos_token_id; pass prepend_bos=False or set one")
    body = context_length - 1 if prepend_bos else context_length
    buffer: list[int] = []
    n_out = 0
    texts = iter_texts(source, text_column=text_column, split=split,
                       held_out_fraction=held_out_fraction, hf_split=hf_split)
    while max_blocks is None or n_out < max_blocks:
        docs = [t for _, t in zip(range(docs_per_batch), texts)]
        if not docs:
            break
        for ids in tok(docs, add_special_tokens=False)["input_ids"]:
            buffer.extend(ids)
            if eos is not None:
                buffer.append(eos)
        n = len(buffer) // body
        if max_blocks is not None:
            n = min(n, max_blocks - n_out)
        if n == 0:
            continue
        arr = np.asarray(buffer[: n * body], dtype=np.int64).reshape(n, body)
        del buffer[: n * body]
        if prepend_bos:
            arr = np.concatenate([np.full((n, 1), bos, dtype=np.int64), arr], axis=1)
        n_out += n
        yield arr
    if n_out == 0:
        raise UserError(
            f"source {source!r} (split {split!r}) gave no full block of {context_length} "
            "tokens; use more text or a shorter context_length"
        )


def token_blocks(source, tokenizer, context_length: int, **kwargs) -> np.ndarray:
    """All blocks of `iter_token_blocks` as one int64 array [n_blocks, context_length]."""
    return np.concatenate(list(iter_token_blocks(source, tokenizer, context_length, **kwargs)))


def heldout_blocks(tokenizer, context_length: int, max_blocks: int | None = 256,
                   source=STDLIB, **kwargs) -> np.ndarray:
    """Held-out token blocks (never seen in training), for evaluation (spliced CE)."""
    return token_blocks(source, tokenizer, context_length, split="heldout",
                        max_blocks=max_blocks, **kwargs)
