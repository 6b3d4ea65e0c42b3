"""A trial's own work without Ray, for benchmarks that measure what trials produce: the local
default job's TrialSpec (its model, activation cache, budget and ladder), and one ladder
trained and evaluated by the trial's code path (TrainConfig, cache reader, LadderTrainer,
held-out evaluation)."""

from __future__ import annotations

from raysae.core.training import train_ladder
from raysae.search import preflight
from raysae.search.config import job_config
from raysae.search.job import prepare_activations, trial_spec
from raysae.search.trial.members import evaluate_members
from raysae.search.trial.spec import TrialSpec, train_config
from raysae.search.trial.trainable import _activation_batches, make_trainer


def local_spec(**settings) -> TrialSpec:
    """The local default job's TrialSpec (``settings``: job settings, e.g. targets); builds
    the local model and the activation cache the first time, as the job does."""
    job = job_config("local", **settings)
    model, d_in = preflight.resolve_model(job.model.model, job.model.hook)
    activations, source = prepare_activations(job, model, on_cluster=False)
    return trial_spec(job, False, activations, source, model, d_in)


def train_and_evaluate(spec: TrialSpec, config: dict) -> list[dict]:
    """One trial's members (metrics rows) for the trial config ``config`` (penalty point,
    kind, seed), trained from scratch."""
    cfg = train_config(spec, config)
    trainer = make_trainer(spec, cfg)
    results = train_ladder(cfg, trainer.targets, _activation_batches(spec, cfg, 0, cfg.seed),
                             trainer=trainer)
    members, _ = evaluate_members(spec, cfg, results)
    return members
