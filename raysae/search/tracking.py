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
``ladder/<member>/<metric>`` per member (raysae.search.trainable.ladder_scalars).

The search stage's Optuna study is kept in an Optuna journal file in the results folder
(``study_path``), named after the search, so ``optuna.load_study`` and optuna-dashboard open
it after the job, and ``--resume`` continues the same study.
"""

from __future__ import annotations

import os
from pathlib import Path

JOURNAL_SUFFIX = ".optuna-journal.log"
"""The study journal's file name is the search name plus this (optuna-dashboard opens it)."""
WANDB_DIR = "wandb"
"""Folder of the results where W&B keeps its runs (offline runs: wandb/offline-run-*)."""


def study_path(results: str | os.PathLike, name: str) -> Path:
    """The Optuna journal of search ``name``: RESULTS/<name>.optuna-journal.log."""
    return Path(results) / f"{name}{JOURNAL_SUFFIX}"


def study_storage(path: Path, fresh: bool):
    """Optuna's journal-file storage at ``path`` (``fresh``: an earlier journal of the same
    name is replaced, so a new search never appends to an old study)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path.parent.mkdir(parents=True, exist_ok=True)
    if fresh:
        path.unlink(missing_ok=True)
        Path(f"{path}.lock").unlink(missing_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def close_study(path: Path, name: str) -> int:
    """After the search stage: any trial of the study still RUNNING (its proposal was made
    by a driver that was then killed, and Tune's restored searcher never heard of it) is
    marked FAIL with the reason in its user attributes, so the journal holds only finished
    or failed proposals. Returns how many were closed."""
    import optuna

    if not path.exists():
        return 0
    study = optuna.load_study(study_name=name, storage=study_storage(path, fresh=False))
    stale = [t for t in study.get_trials(deepcopy=False)
             if t.state == optuna.trial.TrialState.RUNNING]
    for trial in stale:
        study._storage.set_trial_user_attr(
            trial._trial_id, "raysae_status",
            "interrupted: proposed before the driver stopped; not restored by --resume")
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return len(stale)


def wandb_offline() -> bool:
    """True when runs must stay on disk: WANDB_MODE says so, or no API key is configured
    (neither WANDB_API_KEY nor `wandb login`)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        return True
    if mode == "online" or os.environ.get("WANDB_API_KEY"):
        return False
    import netrc
    from urllib.parse import urlparse

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
        raise ValueError("--wandb needs the wandb package: pip install wandb (or raysae[track])"
                         ) from err


def tune_callbacks(search_name: str, stage: str, results: str | os.PathLike | None,
                   wandb_project: str | None) -> list:
    """The logger callbacks of one stage's Tune experiment (see the module docstring)."""
    from ray.tune.logger import TBXLoggerCallback

    callbacks: list = [TBXLoggerCallback()]
    if wandb_project:
        callbacks.append(wandb_callback(search_name, stage, results, wandb_project))
    return callbacks


def wandb_callback(search_name: str, stage: str, results, project: str):
    """Tune's WandbLoggerCallback: one run per trial, group = search, job_type = stage."""
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
