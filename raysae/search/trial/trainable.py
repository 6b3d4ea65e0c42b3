"""The Ray Tune function trainable: train a trial's SAEs (an L0 ladder), report, checkpoint,
evaluate.

Training reports (every ``log_every`` steps) carry the ladder's mean lambda, metrics (the
metrics table's columns the trainer reports) and tokens_seen with ``objective = NaN``; the
final report adds ``objective`` (the trial's frontier score, raysae.search.trial.spec), ``status``,
the members' mean metrics and ``members``: one row per SAE (its target, lambda, status and
the evaluator's metrics-table columns), which the results table expands into one row per
(trial, target). One diverging member does not end the others.

Checkpoints hold the whole ladder state (weights, Adam moments, step, lambdas, scale) in a
``weights_only``-loadable file, so a restarted trial resumes every member at the step it
stopped. The final checkpoint also holds every member's SAE (SAELens layout, ``sae/<k>``),
feature statistics and, optionally, global-threshold removal curves.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import torch
from ray import tune

from raysae.activations.batches import iter_activation_batches
from raysae.activations.cache import CacheError, build_cache
from raysae.activations.source import ActivationSource
from raysae.cluster.monitoring import TrialMetrics
from raysae.core.config import TrainConfig
from raysae.core.kinds import DEFAULT_KIND, get_kind, load_plugins
from raysae.core.ladder import LadderTrainer
from raysae.core.memory import keep_freed_memory
from raysae.core.metrics import metric_names
from raysae.core.outcome import CheckpointError, NonFiniteActivationsError
from raysae.core.recipes import UNIT_NORM
from raysae.core.training import train_ladder
from raysae.results.vocabulary import Status
from raysae.search.trial.members import evaluate_members
from raysae.search.trial.rungs import RungScorer, unscored
from raysae.search.trial.scratch import CKPT_PREFIX, remove_stale_checkpoint_folders, scratch_dir
from raysae.search.trial.spec import TrialSpec, frontier_score, train_config
from raysae.settings import SettingError

STATE_FILE = "trainer_state.pt"
def _activation_batches(spec: TrialSpec, cfg: TrainConfig, tokens_done: int, seed: int):
    source = spec.activations
    if not isinstance(source, str):  # live: the trial runs the model on its own device
        source = ActivationSource(**source)
    elif not os.path.isdir(source) and spec.activation_source is not None:
        # This node's first trial builds its cache on its own device and resources (a Ray
        # Data pool would ask for GPUs the trials hold); the others wait for it, bounded.
        src = ActivationSource(**spec.activation_source)
        source = str(build_cache(src, os.path.dirname(source), progress=False, in_process=True,
                                 lock_timeout=spec.data.cache_wait_seconds))
    left = cfg.total_tokens - tokens_done
    # A restart continues the seed's stream at the row it reached: the same rows, in the
    # same batches, as an uninterrupted trial and its seed partners see.
    return iter_activation_batches(source, cfg.batch_size, n_tokens=max(left, 1), seed=seed,
                                   start=tokens_done)


def make_trainer(spec: TrialSpec, cfg: TrainConfig, data: bytes | None = None):
    """The trial's LadderTrainer (restored from checkpoint bytes when given)."""
    targets = [t if t is not None else float(cfg.sae.d_sae) for t in spec.ladder]
    lams = None if spec.lambda_mode == "control" else [cfg.lam]
    if data is not None:
        return LadderTrainer.from_bytes(data, cfg, targets)
    return LadderTrainer(cfg, targets, lams=lams)


def _restore(spec: TrialSpec, cfg: TrainConfig) -> LadderTrainer:
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return make_trainer(spec, cfg)
    with checkpoint.as_directory() as folder:
        return make_trainer(spec, cfg, (Path(folder) / STATE_FILE).read_bytes())


def _report(row: dict[str, Any], trainer: LadderTrainer | None = None, extra=None) -> int:
    """tune.report with a checkpoint folder holding the trainer state (and ``extra(folder)``);
    returns the checkpoint's size in bytes (0 without one)."""
    if trainer is None:
        tune.report(row)
        return 0
    remove_stale_checkpoint_folders()  # earlier reports' (persisted before they returned)
    with tempfile.TemporaryDirectory(prefix=CKPT_PREFIX, dir=scratch_dir()) as folder:
        (Path(folder) / STATE_FILE).write_bytes(trainer.to_bytes())
        if extra is not None:
            extra(Path(folder))
        size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
        tune.report({**row, "checkpoint_bytes": row.get("checkpoint_bytes", 0) + size},
                    checkpoint=tune.Checkpoint.from_directory(folder))
    return size


def _trial_file(name: str):
    """(filesystem, path) of a file in this trial's folder in --storage, reachable from any
    node and across attempts: a reused actor's ``get_trial_dir()`` is a working folder that
    Tune never syncs there, and a retry may run in another one."""
    storage = tune.get_context().get_storage()
    storage.storage_filesystem.create_dir(storage.trial_fs_path, recursive=True)
    return storage.storage_filesystem, storage.trial_fs_path.rstrip("/") + "/" + name


def _write_trial_file(name: str, text: str) -> None:
    fs, path = _trial_file(name)
    with fs.open_output_stream(path) as out:
        out.write(text.encode())


def _maybe_inject_failure(spec: TrialSpec, step: int) -> None:
    if spec.inject_failure_at_step is None or step < spec.inject_failure_at_step:
        return
    fs, marker = _trial_file(".raysae_injected_failure")
    if fs.get_file_info(marker).type == pafs.FileType.NotFound:
        _write_trial_file(".raysae_injected_failure", str(step))
        if spec.inject_failure_kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure at step {step} (TrialSpec.inject_failure_at_step)")


def _mean_row(rows: list[dict[str, float]]) -> dict[str, float]:
    """The ladder's mean of lambda and of every metrics-table column all rows have: the
    trial's row in the progress table."""
    keys = ("lam", *metric_names())
    out = {k: sum(r[k] for r in rows) / len(rows) for k in keys if all(k in r for r in rows)}
    out.update(step=max(r.get("step", r.get("steps", 0)) for r in rows),
               tokens_seen=max(r.get("tokens_seen", 0) for r in rows),
               members_l0=json.dumps([round(r.get("l0", float("nan")), 3) for r in rows]))
    return out


def ladder_scalars(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each ladder member's lambda and metrics-table values, keyed by its target
    (``L0_16``; a ladder without targets: ``m0``, ``m1``...): reported nested, so Tune's
    TensorBoard and W&B loggers show ``ladder/L0_16/l0`` per member (raysae.search.tracking)."""
    out = {}
    for r in rows:
        target = r.get("target_l0")
        key = (f"L0_{target:g}" if isinstance(target, (int, float)) and math.isfinite(target)
               else f"m{int(r.get('member', len(out)))}")
        out[key] = {k: float(r[k]) for k in ("lam", *metric_names())
                    if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])}
    return out


def permanent_errors() -> tuple[type[BaseException], ...]:
    """Errors a retry cannot heal: a corrupt/NaN cache shard, a bad setting, NaN
    activations from the model, an unreadable checkpoint."""
    return (CacheError, SettingError, NonFiniteActivationsError, CheckpointError)


class _EndAtRung(Exception):
    """Raised from the training loop's report hook once a halving proposal's rung is in."""


def run_trial(config: dict[str, Any], spec: TrialSpec) -> None:
    """The function trainable (bind ``spec`` with ``tune.with_parameters``). An error no
    retry can heal ends the trial once, without Tune's retries: a final report with
    ``status = "error"`` and the error as ``status_reason`` (also in the trial's error.txt)."""
    load_plugins(spec.plugins)  # the driver's plugin kinds, before any config names one
    try:
        _train_trial(config, spec)
    except permanent_errors() as err:
        _fail_once(config, spec, err)


def _fail_once(config: dict[str, Any], spec: TrialSpec, err: BaseException) -> None:
    reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
    with contextlib.suppress(OSError, AttributeError):  # the trial still reports its error
        _write_trial_file("error.txt", "".join(
            traceback.format_exception(type(err), err, err.__traceback__)))
    try:
        base = _base_row(spec, train_config(spec, config))
    except Exception:  # the config itself may be what failed

        base = unscored(spec)
    tune.report({**base, "objective": float("nan"), "ce_sae": float("nan"),
                 "status": Status.ERROR, "status_reason": reason})


def _train_trial(config: dict[str, Any], spec: TrialSpec) -> None:
    """Train, evaluate and report one trial (``run_trial`` without its error handling)."""
    entered = time.monotonic()
    torch.set_num_threads(spec.torch_threads)
    remove_stale_checkpoint_folders()  # left by an attempt killed mid-report
    keep_freed_memory()  # the ladder's [K, B, d_sae] temporaries: see core/ladder.py
    cfg = train_config(spec, config)
    trainer = _restore(spec, cfg)
    base = {**_base_row(spec, cfg), "restored_from_step": trainer.step_count,
            "restored_from_tokens": trainer.tokens, "node_id": _node_id(),
            "gpu_ids": _gpu_ids()}
    # this attempt's checkpoints (bytes, when the last was written) and its last report
    written = {"bytes": 0, "at": time.monotonic(), "reported": -math.inf}
    dashboard = _trial_metrics(cfg, trainer)

    rungs = RungScorer(spec, cfg, trainer.tokens)

    def on_log(rows: list[dict[str, float]], live: LadderTrainer) -> None:
        """Every logging step: report to Tune when a checkpoint is due or
        ``report_seconds`` have passed since the last report (wall time decides only what
        Tune hears; what is trained never depends on it)."""
        if not rows:
            return
        now = time.monotonic()
        due = now - written["at"] >= spec.run.checkpoint_seconds and not live.done
        if due or now - written["reported"] >= spec.run.report_seconds:
            row = _mean_row(rows)
            rate = dashboard.record(row)  # tokens/s since the previous report
            if rate is not None:
                row["tokens_per_second"] = rate
            out = {**base, **row, "objective": float("nan"), "ce_sae": float("nan"),
                   "status": Status.RUNNING, "checkpoint_bytes": written["bytes"],
                   "ladder": ladder_scalars(rows)}
            written["bytes"] += _report(out, live if due else None)
            written["reported"] = time.monotonic()
            if due:
                written["at"] = written["reported"]
        _maybe_inject_failure(spec, live.step_count)

    def on_step(live: LadderTrainer) -> None:
        """After every step: a rung passed is scored there, at the tokens the ladder has
        seen, and reported (ASHA may stop the trial at that report; under successive
        halving its rung ends it)."""
        if not rungs.due(live):
            return
        out = {**base, "step": live.step_count, "tokens_seen": live.tokens,
               "objective": float("nan"), "ce_sae": float("nan"), "status": Status.RUNNING,
               "checkpoint_bytes": written["bytes"], **rungs.score(live),
               "setup_seconds": started - entered}
        out["train_seconds"] = time.monotonic() - started - rungs.seconds
        _report(out)
        written["reported"] = time.monotonic()
        if spec.stop_tokens and live.tokens >= spec.stop_tokens:
            raise _EndAtRung  # successive halving: this proposal's rung is its whole life

    batches = _activation_batches(spec, cfg, trainer.tokens, cfg.seed)
    started, first_token = time.monotonic(), trainer.tokens
    try:
        results = train_ladder(cfg, trainer.targets, batches, trainer=trainer, on_log=on_log,
                               on_step=on_step)
    except _EndAtRung:
        return
    trained = time.monotonic()
    members, write_artifacts = evaluate_members(spec, cfg, results, rungs.evaluator)
    # this attempt's own times (a restored trial counts from its checkpoint on)
    timing = {"setup_seconds": started - entered,
              "train_seconds": trained - started - rungs.seconds,
              "eval_seconds": time.monotonic() - trained + rungs.seconds,
              "train_tokens_per_second": (trainer.tokens - first_token)
              / max(trained - started, 1e-9)}
    statuses = {m["status"] for m in members}
    status = next(iter(statuses)) if len(statuses) == 1 else Status.PARTIAL
    final = {**base, **_mean_row([m for m in members if "l0" in m] or members),
             "objective": frontier_score(members, spec), "status": status,
             "members": json.dumps(members), "checkpoint_bytes": written["bytes"], **timing,
             "ladder": ladder_scalars(members)}
    _report(final, trainer, write_artifacts)
    dashboard.finished(status)


def _trial_metrics(cfg: TrainConfig, trainer: LadderTrainer):
    """Dashboard gauges for this trial (tokens/s, l0, mse), tagged with its id and family."""
    return TrialMetrics(tune.get_context().get_trial_id(), cfg.penalty.family,
                        start_tokens=trainer.tokens, targets=trainer.targets)


def _gpu_ids() -> str:
    """The GPUs Ray assigned to this trial ("0,3"; "" without any): Ray sets
    CUDA_VISIBLE_DEVICES to them, so the trial's "cuda" device is exactly these."""
    return ",".join(str(i) for i in ray.get_gpu_ids())


def _node_id() -> str:
    """The Ray node of this attempt: fake nodes on one machine share ``node_ip``, ids differ."""
    return ray.get_runtime_context().get_node_id()


def _base_row(spec: TrialSpec, cfg: TrainConfig) -> dict[str, Any]:
    """The penalty's columns (name, family, label, each parameter), the kind with its
    options (JSON, every field) and the seed. A baseline kind is its own family and label
    (kind.label); another penalised kind (p-anneal) labels its final penalty."""
    kind = get_kind(cfg.kind)
    family = kind.family(cfg)
    label = cfg.penalty.label if kind.name == DEFAULT_KIND else (
        f"{kind.label}({cfg.penalty.label})" if kind.uses_penalty else kind.label)
    options = kind.options(cfg.kind_options.get(cfg.kind)).record()
    return {"penalty": cfg.penalty.name, **cfg.penalty.params, "family": family,
            "label": label, "kind": cfg.kind, "kind_options": options,
            "lambda_mode": spec.lambda_mode,
            "recipe": cfg.recipe if kind.uses_penalty else UNIT_NORM, "seed": cfg.seed,
            **unscored(spec)}
