"""raysae: a Ray-distributed search for the best sparsity penalty of sparse autoencoders.

The public API (everything else is reachable through its subpackage):

    from raysae import job_config, run_job
    run_job(job_config("local", targets=(8, 16), num_trials=2))       # = `raysae search`

    from raysae import TrainConfig, SAEConfig, PenaltyConfig, train_ladder
    cfg = TrainConfig(sae=SAEConfig(128, 512), penalty=PenaltyConfig.power(p=0.5, eps=0.01))
    results = train_ladder(cfg, [8, 32], batches)  # a ladder: one SAE per target L0

    @register_penalty("mine", PenaltyParam("a", 0, 10, 1, search=(0.1, 10), log=True))
    def mine(f, *, a, grad_floor): return (a * f).sum(-1)    # picked up by CLI and search
"""

from __future__ import annotations

from raysae.core.config import PenaltyConfig, SAEConfig, TrainConfig
from raysae.core.penalties import PenaltyParam, register_penalty
from raysae.core.sae import SAE
from raysae.core.training import train_ladder


def job_config(*args, **kwargs):
    """raysae.search.config.job_config."""
    # on use: the search stack (pandas, pyarrow, Ray Tune) stays out of `import raysae`
    from raysae.search.config import job_config as build

    return build(*args, **kwargs)


def run_job(cfg, *, sweep: bool = False):
    """raysae.search.job.run: run a validated JobConfig; returns the results folder."""
    # on use: the search stack (pandas, pyarrow, Ray Tune) stays out of `import raysae`
    from raysae.search.job import run

    return run(cfg, sweep=sweep)


__all__ = ["PenaltyConfig", "PenaltyParam", "SAE", "SAEConfig", "TrainConfig", "job_config",
           "register_penalty", "run_job", "train_ladder"]
