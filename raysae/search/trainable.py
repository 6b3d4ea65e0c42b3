"""The Ray Tune function trainable: train one SAE, report, checkpoint, evaluate.

Every trial reports the same metrics. Training rows (every ``report_every`` steps) carry
l0, mse, fvu, cos_sim, l2_ratio, dead_fraction, tokens_seen, lam and ``objective = NaN``
(CE needs the held-out evaluation); the final row adds ce_clean, ce_sae, ce_zero,
ce_recovered, the feature statistics, ``objective`` and ``status`` (finished, diverged or
data_exhausted). A diverged trial ends with a finite, clearly bad objective
(``BAD_OBJECTIVE``) instead of an exception, so the searcher learns to avoid the region.

Checkpoints hold the whole trainer state (SAE, Adam moments, step, lambda, scale) in a
``weights_only``-loadable file, so a restarted trial continues at the step it stopped.
The final checkpoint also holds the SAE (SAELens layout), its feature statistics and,
optionally, its global-threshold removal curve.
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from raysae.core.config import PenaltyConfig, TrainConfig
from raysae.core.penalties import penalty_scale_at_one
from raysae.core.train import DIVERGED, FINISHED, Trainer, train_sae
from raysae.search.space import penalty_of

STATE_FILE = "trainer_state.pt"
SAE_DIR = "sae"
SWEEP_FILE = "threshold_sweep.parquet"
BAD_OBJECTIVE = 1e3
LAMBDA_MODES = ("search", "control", "fixed")


@dataclass(frozen=True)
class TrialSpec:
    """What every trial of one search shares; the searcher varies only the penalty (family
    and parameters) and, in search mode, lambda."""

    activations: str | dict
    """Activation cache folder, or a JSON-able ActivationSource dict (live streaming)."""
    model: str
    """LM hub name or local checkpoint folder (for the held-out CE)."""
    hook: str
    """Hook name whose activations the SAE reconstructs."""
    train: TrainConfig
    """The training template (shape set); a trial fills in penalty, lambda, target, seed."""
    activation_source: dict | None = None
    """The ActivationSource the cache was built from: a node that lacks the cache folder
    (a fresh cluster worker) builds it from this, once per node (file-locked)."""
    context_length: int = 128
    """Tokens per held-out block."""
    corpus: str = "stdlib"
    """Text source of the held-out evaluation blocks (a raysae.lm.corpus source)."""
    lambda_mode: str = "control"
    """control: a controller drives L0 to the target; search: Optuna proposes lambda;
    fixed: lambda comes from the trial config (grid sweeps)."""
    target_l0: float | None = None
    beta: float = 1.0
    """Objective weight of the L0 miss (nats per unit of |ln(l0 / target)| beyond tol)."""
    tol: float = 0.15
    """Relative L0 miss that costs nothing in the objective."""
    checkpoint_every: int = 4
    """Checkpoint every this many reports (and always at the end)."""
    eval_blocks: int = 64
    feature_tokens: int = 100_000
    threshold_sweep: bool = False
    sweep_points: int = 10
    torch_threads: int = 1
    inject_failure_at_step: int | None = None
    """Fault injection for reliability tests: fail once at this step (first attempt only)."""
    inject_failure_kind: str = "raise"
    """raise: a Python exception; sigkill: the trial's worker process SIGKILLs itself."""

    def __post_init__(self) -> None:
        if self.train.sae is None:
            raise ValueError("TrialSpec.train.sae is None: set the SAE shape before the search")
        if self.lambda_mode not in LAMBDA_MODES:
            raise ValueError(f"lambda_mode = {self.lambda_mode!r} is invalid: allowed "
                             f"{LAMBDA_MODES}")
        if self.lambda_mode == "control" and self.target_l0 is None:
            raise ValueError("lambda_mode 'control' needs target_l0: give a target L0")
        d_sae = self.train.sae.d_sae
        if self.target_l0 is not None and not 0 < self.target_l0 <= d_sae:
            raise ValueError(f"target_l0 = {self.target_l0} is invalid: allowed (0, d_sae="
                             f"{d_sae}]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def objective(ce_sae: float, l0: float, target_l0: float | None, beta: float,
              tol: float) -> float:
    """ce_sae + beta * max(0, |ln(l0 / target)| - ln(1 + tol)); just ce_sae without a target."""
    if not (math.isfinite(ce_sae) and math.isfinite(l0)):
        return BAD_OBJECTIVE
    if target_l0 is None:
        return ce_sae
    miss = abs(math.log(max(l0, 1e-3) / target_l0)) - math.log(1 + tol)
    return ce_sae + beta * max(0.0, miss)


def train_config(spec: TrialSpec, config: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of one trial: the spec's template plus the searched penalty and
    lambda. In control mode lambda starts at lam / rho(1), so the penalty's own scale does
    not set the controller's start."""
    config = flatten_config(config)
    name, params = penalty_of(config)
    penalty = PenaltyConfig(name, params)
    control = spec.lambda_mode == "control"
    lam = float(config.get("lam", spec.train.lam))
    if control:
        lam = spec.train.lam / penalty_scale_at_one(name, penalty.params)
    return replace(spec.train, penalty=penalty, lam=lam,
                   l0_target=spec.target_l0 if control else None, device=trial_device())


def trial_device() -> str:
    """CUDA when the trial was given a GPU (Tune sets CUDA_VISIBLE_DEVICES), else CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def flatten_config(config: dict[str, Any]) -> dict[str, Any]:
    """Grid searches nest a trial's values under "point"; searchers give them flat."""
    return {**config.get("point", {}), **{k: v for k, v in config.items() if k != "point"}}


def _activation_batches(spec: TrialSpec, cfg: TrainConfig, tokens_done: int, seed: int):
    from raysae.activations.batches import iter_activation_batches
    from raysae.activations.source import ActivationSource

    source = spec.activations
    if not isinstance(source, str):
        # Live streaming: one harvest actor per trial, so trials cannot starve each other's
        # Ray Data pipelines of CPUs (see search.live_concurrency).
        source = ActivationSource(**{**source, "num_actors": 1})
    elif not os.path.isdir(source) and spec.activation_source is not None:
        from raysae.activations.cache import build_cache

        src = ActivationSource(**spec.activation_source)
        source = str(build_cache(src, os.path.dirname(source), progress=False))
    left = cfg.total_tokens - tokens_done
    # A different seed after a restart: the resumed trial sees a fresh shuffle, not a replay.
    return iter_activation_batches(source, cfg.batch_size, n_tokens=max(left, 1),
                                   seed=seed + tokens_done)


def _restore(cfg: TrainConfig) -> Trainer:
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return Trainer(cfg)
    with checkpoint.as_directory() as folder:
        return Trainer.from_bytes((Path(folder) / STATE_FILE).read_bytes(), cfg)


def _report(row: dict[str, Any], trainer: Trainer | None = None, extra=None) -> None:
    """tune.report with a checkpoint folder holding the trainer state (and ``extra(folder)``)."""
    from ray import tune

    if trainer is None:
        tune.report(row)
        return
    with tempfile.TemporaryDirectory(prefix="raysae-ckpt-") as folder:
        (Path(folder) / STATE_FILE).write_bytes(trainer.to_bytes())
        if extra is not None:
            extra(Path(folder))
        tune.report(row, checkpoint=tune.Checkpoint.from_directory(folder))


def _maybe_inject_failure(spec: TrialSpec, step: int) -> None:
    from ray import tune

    if spec.inject_failure_at_step is None or step < spec.inject_failure_at_step:
        return
    marker = Path(tune.get_context().get_trial_dir()) / ".raysae_injected_failure"
    if not marker.exists():
        marker.write_text(str(step))
        if spec.inject_failure_kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure at step {step} (TrialSpec.inject_failure_at_step)")


def run_trial(config: dict[str, Any], spec: TrialSpec) -> None:
    """The function trainable (bind ``spec`` with ``tune.with_parameters``)."""
    torch.set_num_threads(spec.torch_threads)
    cfg = train_config(spec, config)
    trainer = _restore(cfg)
    reports = 0
    base = {**_base_row(spec, cfg), "restored_from_step": trainer.step_count,
            "node_id": _node_id()}
    dashboard = _trial_metrics(cfg, trainer)

    def on_log(row: dict[str, float], live: Trainer) -> None:
        nonlocal reports
        reports += 1
        dashboard.record(row)
        out = {**base, **row, "objective": float("nan"), "ce_sae": float("nan"),
               "status": "running"}
        due = reports % spec.checkpoint_every == 0 and not live.done
        _report(out, live if due else None)
        _maybe_inject_failure(spec, live.step_count)

    batches = _activation_batches(spec, cfg, trainer.tokens, cfg.seed)
    result = train_sae(cfg, batches, trainer=trainer, on_log=on_log)
    final, write_artifacts = _finish(spec, cfg, result)
    _report({**base, **final}, trainer, write_artifacts)
    dashboard.finished(result.status)


def _trial_metrics(cfg: TrainConfig, trainer: Trainer):
    """Dashboard gauges for this trial (tokens/s, l0, mse), tagged with its id and family."""
    from ray import tune

    from raysae.cluster.monitoring import TrialMetrics

    return TrialMetrics(tune.get_context().get_trial_id(), cfg.penalty.family,
                        start_tokens=trainer.tokens)


def _node_id() -> str:
    """The Ray node of this attempt: fake nodes on one machine share ``node_ip``, ids differ."""
    import ray

    return ray.get_runtime_context().get_node_id()


def _base_row(spec: TrialSpec, cfg: TrainConfig) -> dict[str, Any]:
    """The penalty's columns (name, family, label, each parameter), target and seed."""
    return {"penalty": cfg.penalty.name, **cfg.penalty.params, "family": cfg.penalty.family,
            "label": cfg.penalty.label, "lambda_mode": spec.lambda_mode, "seed": cfg.seed,
            "target_l0": spec.target_l0 if spec.target_l0 is not None else float("nan")}


def _feature_source(spec: TrialSpec, evaluator):
    """Activations for feature statistics: ``feature_tokens`` rows of the cache (the held-out
    set is too small to see a 1e-5 frequency), or the held-out set when streaming live."""
    if not isinstance(spec.activations, str) or not os.path.isdir(spec.activations):
        return evaluator
    from raysae.activations.batches import iter_activation_batches
    from raysae.activations.cache import load_manifest

    n_tokens = min(spec.feature_tokens, int(load_manifest(spec.activations)["n_tokens"]))
    return iter_activation_batches(spec.activations, 4096, n_tokens=n_tokens,
                                   seed=spec.train.seed)


def _finish(spec: TrialSpec, cfg: TrainConfig, result):
    """The final metrics row and a function that writes the final artifacts into a folder."""
    last = result.final_metrics
    row: dict[str, Any] = {**last, "status": result.status, "lam": result.lam,
                           "steps": result.steps, "tokens_seen": result.tokens,
                           "status_reason": result.reason or ""}
    if result.status == DIVERGED:
        row.update(objective=BAD_OBJECTIVE, ce_sae=BAD_OBJECTIVE, l0=float(cfg.sae.d_sae))
        return row, None
    from raysae.evaluation import feature_stats
    from raysae.evaluation.spliced_ce import heldout_evaluator
    from raysae.lm.models import load_model

    model = load_model(spec.model, device=cfg.device)
    result.sae.to(cfg.device)
    evaluator = heldout_evaluator(model, spec.hook, n_blocks=spec.eval_blocks,
                                  context_length=spec.context_length, source=spec.corpus)
    row.update(evaluator.evaluate(result.sae))
    stats = feature_stats.feature_statistics(_feature_source(spec, evaluator), result.sae,
                                             spec.feature_tokens)
    summary = feature_stats.summarize(*stats)
    row.update({k: summary[k] for k in ("dead_fraction", "low_freq_fraction", "median_nonzero",
                                        "feature_tokens")})
    row["objective"] = objective(row["ce_sae"], row["l0"], spec.target_l0, spec.beta, spec.tol)
    sweep = None
    if spec.threshold_sweep and result.status == FINISHED:
        from raysae.evaluation.ablation import threshold_sweep

        sweep = threshold_sweep(evaluator, result.sae, n_points=spec.sweep_points)

    def write_artifacts(folder: Path) -> None:
        result.sae.save(folder / SAE_DIR, metadata={"model_name": spec.model,
                                                    "hook_name": spec.hook},
                        raysae={"train_config": cfg.to_dict(), "status": result.status,
                                "final_lambda": result.lam})
        feature_stats.save_feature_statistics(folder, *stats)
        if sweep is not None:
            sweep.to_parquet(folder / SWEEP_FILE, index=False)

    return row, write_artifacts


__all__ = ["TrialSpec", "run_trial", "objective", "train_config", "BAD_OBJECTIVE",
           "STATE_FILE", "SAE_DIR", "SWEEP_FILE"]
