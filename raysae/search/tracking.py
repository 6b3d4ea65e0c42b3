"""The field's own trackers watching a search: W&B, TensorBoard and the Optuna study on disk.

Researchers watch SAE training in Weights & Biases or TensorBoard and open Optuna studies in
optuna-dashboard; raysae's Grafana charts need a Prometheus/Grafana install a laptop rarely
has. So every Tune experiment of a search gets:

- Tune's TensorBoard logger (``TBXLoggerCallback``): one event file per trial, in the trial's
  folder of the experiment under --storage (``tensorboard --logdir STORAGE``);
- with ``--wandb [PROJECT]``, Tune's W&B logger (``WandbLoggerCallback``): one run per trial,
  grouped by search (``group``) and stage (``job_type``), the trial's penalty parameters as its
  config; offline (files under RESULTS/wandb, uploaded later with ``wandb sync``) when this
  machine has no W&B API key.

Both log every numeric value a trial reports, flattened with "/": the ladder's means and
``ladder/<member>/<metric>`` per member (raysae.search.trial.trainable.ladder_scalars).

The search stage's Optuna study lives in memory in the searcher, which Tune saves with its
experiment in --storage: a resume continues the same study from the storage alone. It is
written out as an Optuna journal file (``study_path``: RESULTS/<name>.optuna-journal.log, and
the same file in STORAGE/NAME), named after the search, whenever the searcher is saved (each
experiment checkpoint, each finished proposal) and at the stage's end, so
``optuna.load_study`` and optuna-dashboard open it during and after the job. The journal is
a copy, rewritten whole each time from the searcher's study: it never lags Tune's state by
more than a checkpoint, and a journal lost with a head is rebuilt from Tune's.
"""

from __future__ import annotations

import netrc
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from ray.tune.logger import TBXLoggerCallback

from raysae import io
from raysae.search import storage_files
from raysae.settings import UserError

JOURNAL_SUFFIX = ".optuna-journal.log"
"""The study journal's file name is the search name plus this (optuna-dashboard opens it)."""
WANDB_DIR = "wandb"
"""Folder of the results where W&B keeps its runs (offline runs: wandb/offline-run-*)."""


def study_path(results: str | os.PathLike, name: str) -> Path:
    """The Optuna journal of search ``name``: RESULTS/<name>.optuna-journal.log."""
    return Path(results) / f"{name}{JOURNAL_SUFFIX}"


def study_storage(path: Path):
    """Optuna's journal-file storage at ``path`` (reading a journal this module wrote)."""
    return JournalStorage(JournalFileBackend(str(path)))


_JOURNAL: dict[str, Any] = {}
"""Where this driver writes the current search's journal (``use_journal``): the search
stage's searcher, new or restored by Tune, writes its study there."""
INTERRUPTED = "interrupted: proposed before the driver stopped; not restored by --resume"


def use_journal(local: Path | None, storage: str, name: str) -> None:
    """Write the journal of search ``name`` to ``local`` and to ``STORAGE/NAME``."""
    _JOURNAL.clear()
    _JOURNAL.update(local=local, storage=storage, name=name)


def mirror_study(study, *, final: bool = False) -> int:
    """Write ``study`` (the searcher's, in memory) as the search's journal, whole, locally
    and in --storage; ``final`` (the stage has ended): a trial still RUNNING (proposed by a
    driver that was then killed, never restored) is written as FAIL with the reason in its
    user attributes. Returns how many were so closed."""
    if not _JOURNAL or study is None:
        return 0
    _JOURNAL["study"] = study
    name, local = _JOURNAL["name"], _JOURNAL["local"]
    trials, closed = [], 0
    for t in study.get_trials(deepcopy=True):
        if final and t.state == optuna.trial.TrialState.RUNNING:
            t = optuna.trial.create_trial(
                state=optuna.trial.TrialState.FAIL, params=t.params,
                distributions=t.distributions, system_attrs=t.system_attrs,
                user_attrs={**t.user_attrs, "raysae_status": INTERRUPTED},
                intermediate_values=t.intermediate_values)
            closed += 1
        trials.append(t)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}{JOURNAL_SUFFIX}"
        copy = optuna.create_study(study_name=name, storage=study_storage(path),
                                   directions=study.directions)
        for key, value in study.user_attrs.items():
            copy.set_user_attr(key, value)
        copy.add_trials(trials)
        data = path.read_bytes()
    if local is not None:
        io.write_bytes(local, data)
    storage_files.write(_JOURNAL["storage"], name, path.name, data)
    return closed


def close_journal() -> int:
    """At the search stage's end: its journal written a last time, proposals a killed driver
    left RUNNING closed as FAIL (``mirror_study``); how many were closed."""
    return mirror_study(_JOURNAL.get("study"), final=True)


def fetch_journal(storage: str, name: str, local: Path) -> bool:
    """On --resume: the journal kept in --storage, copied to ``local`` when that is missing
    (a new head); the searcher rewrites it from Tune's state at its next save. Returns
    whether one was copied."""
    if local.exists():
        return False
    data = storage_files.read(storage, name, f"{name}{JOURNAL_SUFFIX}")
    if data is None:
        return False
    io.write_bytes(local, data)
    return True


def wandb_offline() -> bool:
    """True when runs must stay on disk: WANDB_MODE says so, or no API key is configured
    (neither WANDB_API_KEY nor `wandb login`)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        return True
    if mode == "online" or os.environ.get("WANDB_API_KEY"):
        return False

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:  # where `wandb login` keeps the key
        return netrc.netrc().authenticators(host or "api.wandb.ai") is None
    except (OSError, netrc.NetrcParseError):
        return True


def check_wandb() -> None:
    """Fail before any work when --wandb is given and wandb is not installed."""
    try:
        import wandb  # noqa: F401
    except ImportError as err:
        raise UserError("--wandb needs the wandb package: pip install wandb (or raysae[track])"
                         ) from err


def tune_callbacks(search_name: str, stage: str, results: str | os.PathLike | None,
                   wandb_project: str | None) -> list:
    """The logger callbacks of one stage's Tune experiment (see the module docstring)."""
    callbacks: list = [TBXLoggerCallback()]
    if wandb_project:
        callbacks.append(wandb_callback(search_name, stage, results, wandb_project))
    return callbacks


def wandb_callback(search_name: str, stage: str, results, project: str):
    """Tune's WandbLoggerCallback: one run per trial, group = search, job_type = stage."""
    # on use: it imports wandb, needed only with --wandb
    from ray.air.integrations.wandb import WandbLoggerCallback

    folder = Path(results or ".").resolve()  # wandb keeps its runs in <dir>/wandb
    folder.mkdir(parents=True, exist_ok=True)
    offline = wandb_offline()
    if offline:  # read by Tune's own API-key check, which it skips offline
        os.environ["WANDB_MODE"] = "offline"
    mode = "disabled" if os.environ.get("WANDB_MODE", "").lower() == "disabled" else (
        "offline" if offline else "online")
    return WandbLoggerCallback(project=project, group=search_name, job_type=stage,
                               tags=[search_name, stage], dir=str(folder), mode=mode,
                               excludes=["members", "members_l0", "status_reason"])


def where(storage: str, journal: Path | None, wandb_results: Path | None) -> str:
    """What the job prints at its end: the commands that open its logs in each tool."""
    lines = [f"raysae: TensorBoard: tensorboard --logdir {storage}"]
    if journal is not None:
        lines.append(f"raysae: Optuna study: optuna-dashboard {journal}")
    if wandb_results is not None:
        folder = Path(wandb_results) / WANDB_DIR
        lines.append(f"raysae: W&B runs offline in {folder}; upload them with: wandb sync "
                     f"{folder}/offline-run-*" if wandb_offline()
                     else f"raysae: W&B runs online (local copies in {folder})")
    return "\n".join(lines)
