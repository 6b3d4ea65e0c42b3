"""The field's trackers read back what a search wrote: W&B's offline runs (decoded with
wandb's own record schema), TensorBoard's event files (tensorboard's own reader), the Optuna
study's journal (optuna.load_study) and optuna-dashboard serving it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import wandb_records

from raysae import cli
from raysae.search.tracking import JOURNAL_SUFFIX, study_path, wandb_offline

NAME = "tracked"
TARGETS = ("4", "8")


@pytest.fixture(scope="module")
def tracked(tiny_model_dir, ray_local, tmp_path_factory):
    """A small search run through the CLI with --wandb and no W&B key: (storage, results)."""
    root = tmp_path_factory.mktemp("tracked")
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_API_KEY")}
    os.environ.pop("WANDB_MODE", None)  # offline follows from the missing key...
    os.environ.pop("WANDB_API_KEY", None)
    if not wandb_offline():  # ...unless this machine has `wandb login`'s key: never upload
        os.environ["WANDB_MODE"] = "offline"
    try:
        args = ["search", "--name", NAME, "--model", str(tiny_model_dir),
                "--hook", "blocks.0.hook_resid_post", "--context-length", "32",
                "--targets", *TARGETS, "--num-trials", "2", "--seeds", "0",
                "--baselines", "topk", "--max-concurrent", "2", "--total-tokens", "30720",
                "--cache-tokens", "16384", "--batch-size", "1024", "--log-every", "5",
                "--report-seconds", "0",  # every logging step reaches the trackers
                "--storage", str(root / "tune"), "--results", str(root / "results"),
                "--no-report", "--wandb", "raysae-test"]
        assert cli.main(args) == 0
        assert cli.main([*args, "--resume"]) == 0  # the same study continues, nothing redone
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return root / "tune", root / "results"


def _trials(results: Path) -> pd.DataFrame:
    return pd.read_parquet(results / "trials.parquet")


def test_wandb_offline_run_per_trial_with_member_l0_history(tracked):
    _, results = tracked
    trials = _trials(results)
    runs = {}
    for path in (results / "wandb").glob("offline-run-*/run-*.wandb"):
        info = wandb_records.run_info(path)
        if not info:  # a file W&B opened and closed with no run record (seen once under
            assert not wandb_records.history(path), path  # load, from the resumed run):
            continue  # it must hold nothing a reader would miss
        runs.setdefault(info["run_id"], []).append(path)
    # One run per Tune trial (the resume reran none), grouped by search, typed by stage.
    assert set(runs) == set(trials["tune_trial_id"]), sorted(runs)
    assert all(len(paths) == 1 for paths in runs.values()), runs
    for tid, (path,) in runs.items():
        info = wandb_records.run_info(path)
        rows = trials[trials["tune_trial_id"] == tid]
        assert info["project"] == "raysae-test" and info["group"] == NAME
        assert info["job_type"] == rows["experiment"].iloc[0].removeprefix(f"{NAME}_")
        history = wandb_records.history(path)
        for target in TARGETS:  # every ladder member's L0, logged during training
            l0 = [r[f"ladder/L0_{target}/l0"] for r in history if f"ladder/L0_{target}/l0" in r]
            assert len(l0) >= 3 and all(v >= 0 for v in l0), (tid, target, l0)
        final = rows.set_index("target_l0")
        last = [r for r in history if f"ladder/L0_{TARGETS[0]}/ce_sae" in r][-1]
        for target in TARGETS:  # the final CE of each member, as in trials.parquet
            assert last[f"ladder/L0_{target}/ce_sae"] == pytest.approx(
                final.loc[float(target), "ce_sae"])
        assert any(r.get("tokens_per_second", 0) > 0 for r in history)
        config = wandb_records.config(path)
        if (rows["experiment"] == f"{NAME}_search").all():  # the proposal's parameters
            for key in ("power.p", "power.eps"):
                assert config[key] == pytest.approx(rows[key.split(".")[1]].iloc[0])


def test_tensorboard_event_files_hold_member_l0(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    storage, results = tracked
    trials = _trials(results)
    for tid in trials["tune_trial_id"].unique():
        (folder,) = [p for p in storage.glob(f"{NAME}_*/*{tid}*") if p.is_dir()]
        events = EventAccumulator(str(folder))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        for target in TARGETS:
            steps = events.Scalars(f"ray/tune/ladder/L0_{target}/l0")
            assert len(steps) >= 3, (tid, target)
        assert f"ray/tune/ladder/L0_{TARGETS[-1]}/ce_sae" in tags


def test_optuna_journal_holds_every_proposal_with_its_score(tracked):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    _, results = tracked
    path = study_path(results, NAME)
    assert path.name == NAME + JOURNAL_SUFFIX and path.exists()
    study = optuna.load_study(study_name=NAME,
                              storage=JournalStorage(JournalFileBackend(str(path))))
    searched = _trials(results)
    searched = searched[searched["experiment"] == f"{NAME}_search"].drop_duplicates(
        "tune_trial_id")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(study.trials) == len(done) == len(searched) == 2  # the resume added none
    by_score = {round(t.value, 9): t for t in done}
    for row in searched.itertuples():
        trial = by_score[round(row.trial_objective, 9)]
        # the family is a parameter only when the search has several
        assert trial.params.get("penalty", row.penalty) == row.penalty
        assert trial.params["power.p"] == pytest.approx(row.p)
        assert trial.params["power.eps"] == pytest.approx(row.eps)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_optuna_dashboard_serves_the_study(tracked):
    exe = shutil.which("optuna-dashboard") or str(Path(sys.executable).with_name(
        "optuna-dashboard"))
    if not Path(exe).exists():
        pytest.skip("optuna-dashboard is not installed (pip install optuna-dashboard)")
    _, results = tracked
    port = _free_port()
    proc = subprocess.Popen([exe, str(study_path(results, NAME)), "--host", "127.0.0.1",
                             "--port", str(port), "--server", "wsgiref", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, studies = time.time() + 60, None
        while studies is None and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies",
                                            timeout=5) as resp:
                    studies = json.loads(resp.read())["study_summaries"]
            except OSError:
                time.sleep(0.5)
        (study,) = [s for s in studies if s["study_name"] == NAME]
        page = f"http://127.0.0.1:{port}/dashboard/studies/{study['study_id']}"
        with urllib.request.urlopen(page, timeout=10) as resp:
            assert resp.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_journal_is_written_locally_and_in_storage_and_closes_orphans(tmp_path):
    """The searcher's study (in memory) is written out whole as the journal, in the results
    folder and in --storage; at the stage's end a proposal whose driver died (RUNNING,
    never restored) is written as FAIL with its reason; finished ones are untouched; a new
    head's resume fetches the journal from --storage."""
    import optuna

    from raysae.search import tracking

    path, storage = study_path(tmp_path / "results", NAME), str(tmp_path / "tune")
    tracking.use_journal(path, storage, NAME)
    study = optuna.create_study(study_name=NAME)
    done = study.ask()
    done.suggest_float("power.p", 0.1, 1.0)
    study.tell(done, 0.5)
    orphan = study.ask()
    orphan.suggest_float("power.p", 0.1, 1.0)
    assert tracking.mirror_study(study) == 0
    running = optuna.load_study(study_name=NAME, storage=tracking.study_storage(path))
    assert [t.state.name for t in running.trials] == ["COMPLETE", "RUNNING"]
    assert tracking.close_journal() == 1
    kept = tmp_path / "tune" / NAME / path.name
    for journal in (path, kept):
        states = {t.number: t for t in optuna.load_study(
            study_name=NAME, storage=tracking.study_storage(journal)).trials}
        assert states[done.number].state == optuna.trial.TrialState.COMPLETE
        assert states[done.number].value == 0.5
        assert states[orphan.number].state == optuna.trial.TrialState.FAIL
        assert "interrupted" in states[orphan.number].user_attrs["raysae_status"]
    path.unlink()
    assert tracking.fetch_journal(storage, NAME, path) and path.read_bytes() == kept.read_bytes()
    assert not tracking.fetch_journal(storage, NAME, path)  # a local one is kept


def test_wandb_flag_alone_names_the_default_project():
    from raysae.cli import build_parser
    from raysae.cli.flags import given

    parse = build_parser().parse_args
    assert given(parse(["search", "--wandb"]))["wandb"] == "raysae"
    assert given(parse(["search", "--wandb", "mine"]))["wandb"] == "mine"
    assert "wandb" not in given(parse(["search"]))
