"""Files a search keeps beside its Tune experiments in --storage (a local folder or any URI
pyarrow opens, s3://bucket/prefix on a cluster): ``STORAGE/NAME/<file>``.

The job settings and the Optuna study's journal live there as well as on the driver's disk,
so a search resumes from the storage alone: a new head with an empty disk reads them back
(raysae.search.stored, raysae.search.tracking).
"""

from __future__ import annotations

import os

import pyarrow.fs as pafs
from ray import tune

from raysae import io


def storage_root(storage: str) -> str:
    """Absolute local path or an untouched URI (pyarrow resolves s3://, gs://, ...)."""
    return storage if "://" in storage else os.path.abspath(os.path.expanduser(storage))


def search_folder(storage: str, name: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of the search's own folder, ``STORAGE/NAME``."""
    root = storage_root(storage)
    if "://" not in root:
        return pafs.LocalFileSystem(), os.path.join(root, name)
    fs, path = pafs.FileSystem.from_uri(root)
    return fs, f"{path.rstrip('/')}/{name}"


def where(storage: str, name: str, filename: str) -> str:
    """The file's address as a user writes it (a path or a URI)."""
    return f"{storage_root(storage).rstrip('/')}/{name}/{filename}"


def write(storage: str, name: str, filename: str, data: bytes) -> str:
    """Put ``data`` at ``STORAGE/NAME/filename``, whole or not at all (a local file is
    renamed into place; an object store's PUT is atomic). Returns its address."""
    fs, folder = search_folder(storage, name)
    path = f"{folder}/{filename}"
    if isinstance(fs, pafs.LocalFileSystem):
        io.write_bytes(path, data)
    else:
        fs.create_dir(folder, recursive=True)
        with fs.open_output_stream(path) as out:
            out.write(data)
    return where(storage, name, filename)


def remove(storage: str, name: str, filename: str) -> None:
    """Delete ``STORAGE/NAME/filename`` if it is there."""
    fs, folder = search_folder(storage, name)
    path = f"{folder}/{filename}"
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def read(storage: str, name: str, filename: str) -> bytes | None:
    """The bytes of ``STORAGE/NAME/filename``, or None when there is no such file."""
    fs, folder = search_folder(storage, name)
    path = f"{folder}/{filename}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as src:
        return src.read()


def experiments(storage: str, name: str) -> list[str]:
    """The Tune experiments of search ``name`` that a resume would restore: those of its
    stages (``NAME_refs``, ``NAME_search``, ...) or of a sweep (``NAME``)."""
    root = storage_root(storage).rstrip("/")
    if "://" in root:
        fs, base = pafs.FileSystem.from_uri(root)
    else:
        fs, base = pafs.LocalFileSystem(), root
    found = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    names = [os.path.basename(i.path) for i in found if i.type == pafs.FileType.Directory]
    mine = [n for n in names if n == name or n.startswith(f"{name}_")]
    return sorted(n for n in mine if tune.Tuner.can_restore(f"{root}/{n}"))
