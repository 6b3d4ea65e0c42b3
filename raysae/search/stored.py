"""A search's stored settings: what `--resume` checks its flags against.

At start the job writes its whole config to ``STORAGE/NAME/job_settings.json`` (atomically;
for a remote --storage, next to the results). A resumed search compares the settings that
change results (everything but where and how it runs: folders, Ray address, report, resources,
retries) with the stored ones; a difference is refused with the list of them, unless
--resume-changed (raysae.search.run_settings.RunSettings) accepts it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raysae import io
from raysae.settings import flag_name

SETTINGS_FILE = "job_settings.json"
NOT_RESULTS = {
    "run": None,  # the whole section: name, folders, resume, address, report, monitoring
    "search": {"max_concurrent", "cpus_per_trial", "gpus_per_trial", "max_failures"},
    "activations": {"cache"},  # where a cache lies; its settings are checked against the model
}
"""Settings that do not change a search's results: free to differ on --resume."""


def settings_path(cfg, name: str, results: Path) -> Path:
    """Where the search's settings are stored (under --storage when it is local)."""
    storage = cfg.run.storage
    if "://" in storage:
        return Path(results) / SETTINGS_FILE
    return Path(storage).expanduser().resolve() / name / SETTINGS_FILE


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


def check_resume(cfg, name: str, results: Path, sweep: bool) -> list[str]:
    """On --resume: the differences from the stored settings (refused unless
    --resume-changed); [] when nothing changed or nothing was stored."""
    path = settings_path(cfg, name, results)
    if not cfg.run.resume or not path.is_file():
        return []
    try:
        stored = json.loads(path.read_text()).get("result_settings") or {}
    except (OSError, ValueError):
        return []
    diff = differences(stored, result_settings(cfg, sweep))
    if diff and not cfg.run.resume_changed:
        raise ValueError(f"--resume of search {name!r} with settings that change its results: "
                         f"{'; '.join(diff)} (stored in {path}); pass the stored values, "
                         "a new --name for a new search, or --resume-changed to continue "
                         "anyway (see --help)")
    return diff


def store(cfg, name: str, results: Path, sweep: bool) -> Path:
    """Write the search's settings (atomic), before any Tune experiment starts."""
    path = settings_path(cfg, name, results)
    path.parent.mkdir(parents=True, exist_ok=True)
    return io.write_json(path, {"name": name, "result_settings": result_settings(cfg, sweep),
                                "config": json.loads(json.dumps(cfg.to_dict(), default=str))})
