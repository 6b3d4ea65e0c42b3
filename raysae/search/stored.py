"""A search's stored settings: what `--resume` checks its flags against.

At start the job writes its whole config to ``STORAGE/NAME/job_settings.json`` (atomically;
in --storage itself, local or s3://, so a new head resumes from the storage alone). A resumed
search compares the settings that change results (everything but where and how it runs:
folders, Ray address, report, resources, retries) with the stored ones; a difference is
refused with the list of them, unless --resume-changed (raysae.search.run_settings.
RunSettings) accepts it. A resume finds what it continues or says what is missing: no
stored settings beside Tune experiments of the search, or nothing stored at all, is an
error that names the file, never a silent fresh start.
"""

from __future__ import annotations

import json
from typing import Any

from raysae.search import storage_files
from raysae.settings import UserError, flag_name

SETTINGS_FILE = "job_settings.json"
NOT_RESULTS = {
    "run": None,  # the whole section: name, folders, resume, address, report, monitoring
    "search": {"max_concurrent", "cpus_per_trial", "gpus_per_trial", "gpu_memory_gib",
               "max_failures"},
    "activations": {"cache"},  # where a cache lies; its settings are checked against the model
}
"""Settings that do not change a search's results: free to differ on --resume."""


def result_settings(cfg, sweep: bool) -> dict[str, Any]:
    """``section.field`` -> value (JSON types) of every setting that changes results."""
    out: dict[str, Any] = {"command": "sweep" if sweep else "search", "preset": cfg.preset}
    for section, values in cfg.to_dict().items():
        if not isinstance(values, dict):
            continue
        skip = NOT_RESULTS.get(section, set())
        if section in NOT_RESULTS and skip is None:
            continue
        for key, value in values.items():
            if key not in skip:
                out[f"{section}.{key}"] = value
    return json.loads(json.dumps(out, default=str))


def _show(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return "(none)" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def differences(stored: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``--flag OLD -> NEW`` per setting that differs."""
    out = []
    for key in sorted(set(stored) | set(now)):
        if stored.get(key) != now.get(key):
            field = key.rsplit(".", 1)[-1]
            name = {"command": "command", "ranges": "--PARAM-range"}.get(field, flag_name(field))
            out.append(f"{name} {_show(stored.get(key))} -> {_show(now.get(key))}")
    return out


def check_resume(cfg, name: str, sweep: bool) -> list[str]:
    """On --resume: the differences from the stored settings (refused unless
    --resume-changed); [] when nothing changed. A missing or unreadable settings file is an
    error naming it."""
    if not cfg.run.resume:
        return []
    storage, where = cfg.run.storage, storage_files.where(cfg.run.storage, name, SETTINGS_FILE)
    data = storage_files.read(storage, name, SETTINGS_FILE)
    if data is None:
        found = storage_files.experiments(storage, name)
        if found:
            raise UserError(f"--resume of search {name!r}: its settings file {where} is "
                             f"missing, though its Tune experiments {found} are there; "
                             "restore the file, or start a new search with another --name")
        raise UserError(f"--resume: there is no search {name!r} in --storage "
                         f"{storage_files.storage_root(storage)} (no {SETTINGS_FILE}, no Tune "
                         "experiment); check --storage and --name, or drop --resume to "
                         "start it")
    try:
        stored = json.loads(data)["result_settings"]
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"--resume of search {name!r}: {where} is not a settings file "
                         f"({err}); restore it, or start a new search with another --name"
                         ) from None
    diff = differences(stored, result_settings(cfg, sweep))
    if diff and not cfg.run.resume_changed:
        raise UserError(f"--resume of search {name!r} with settings that change its results: "
                         f"{'; '.join(diff)} (stored in {where}); pass the stored values, "
                         "a new --name for a new search, or --resume-changed to continue "
                         "anyway (see --help)")
    return diff


def forget_unstarted(cfg, name: str) -> None:
    """After a failure or interrupt: the stored settings of a search that started no Tune
    experiment are removed (nothing to resume; a bad model found while its cache was built
    leaves no file behind)."""
    if not storage_files.experiments(cfg.run.storage, name):
        storage_files.remove(cfg.run.storage, name, SETTINGS_FILE)


def store(cfg, name: str, sweep: bool) -> str:
    """Write the search's settings to its folder in --storage, whole or not at all, before
    any work a resume would continue; returns where."""
    record = {"name": name, "result_settings": result_settings(cfg, sweep),
              "config": json.loads(json.dumps(cfg.to_dict(), default=str))}
    return storage_files.write(cfg.run.storage, name, SETTINGS_FILE,
                               json.dumps(record, indent=2).encode())
