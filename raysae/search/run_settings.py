"""The job's sweep and run settings (part of the config tree in raysae.search.config):
the lambda grid of `raysae sweep`, and names, folders, resume and Ray address."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from raysae.core.penalties import get_penalty
from raysae.settings import is_number, positive_int, require

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
"""A search name (--name): one path component, so every write stays under --storage."""


@dataclass(frozen=True)
class SweepSettings:
    """The lambda grid of `raysae sweep` (the study's baseline)."""

    lambdas: tuple[float, ...] | None = None
    """Lambda grid (default: n_lambdas values log-spaced over lam_range)."""
    n_lambdas: int = 5
    """Grid points when lambdas is not given."""
    exponents: tuple[float, ...] = (1.0, 0.5, 0.25)
    """Exponents p of the pure power penalty, one family each (1 = L1, 0.5 = sqrt)."""

    def __post_init__(self) -> None:
        positive_int(self, "n_lambdas")
        for lam in self.lambdas or ():
            require(is_number(lam) and lam >= 0, "lambdas", lam, "lambda must be a number "
                    ">= 0", "pass non-negative penalty coefficients")
        param = get_penalty("power").param("p")
        for p in self.exponents:
            require(param.contains(p), "exponents", p, f"the exponent p of penalty 'power' "
                    f"must be in {param.range_text()}", "pass exponents such as 1 0.5 0.25")


@dataclass(frozen=True)
class RunSettings:
    """Names, folders and where Ray runs."""

    name: str | None = None
    """Search name (default: exponent_search or l1_sweep)."""
    storage: str = field(default_factory=lambda: os.environ.get("RAYSAE_STORAGE", "results"))
    """Where Tune keeps experiments: a folder or s3://bucket/prefix (default
    $RAYSAE_STORAGE or ./results)."""
    results: str | None = None
    """Folder for trials.parquet and report.html (default: STORAGE/NAME/analysis when
    STORAGE is local, else ./results/NAME/analysis)."""
    resume: bool = False
    """Continue an interrupted search of the same name: finished trials are kept,
    unfinished ones resume from their last checkpoint. Settings that change results must
    equal the stored ones (STORAGE/NAME/job_settings.json), else it is refused."""
    resume_changed: bool = False
    """With --resume, accept changed result-affecting settings (the differences are
    printed): Tune continues each experiment as it stored it (its trial count and search
    space; finished trials are kept as they are and stay in trials.parquet) and the new
    settings reach only trials that start or restart now."""

    def __post_init__(self) -> None:
        for name in ("checkpoint_seconds", "report_seconds"):
            require(is_number(getattr(self, name)) and getattr(self, name) >= 0, name,
                    getattr(self, name), "must be a number >= 0")
        if self.name is not None:
            require(bool(NAME_PATTERN.fullmatch(self.name)), "name", repr(self.name),
                    "a search name is one folder name: letters, digits, '.', '_' and '-', "
                    "starting with a letter or digit, at most 100 characters",
                    "pass e.g. {name} my_search")

    address: str | None = None
    """Ray cluster address (default: $RAY_ADDRESS, a running cluster, or an embedded
    local Ray)."""
    checkpoint_seconds: float = 300.0
    """Save each trial's state (every ladder member's weights and Adam state) at most this
    often, in seconds of its training, plus once at the end; a restarted trial loses at
    most this much work. Each checkpoint is written to --storage (S3 on a cluster): at the
    pythia-70m preset one is about 150 MB. 0: at every logging report."""
    report_seconds: float = 15.0
    """Report each trial's training progress to Tune (its progress table, TensorBoard, W&B)
    at most this often, in seconds, plus its first, rung, checkpoint and final reports;
    metrics are still recorded at every --log-every step and every decision taken there
    (the controller, the sparse-step switch) stays on the step count. 0: every logging
    step."""
    keep_nodes: bool = True
    """On an autoscaling cluster, hold the nodes the search has grown to until its last
    stage ends (raysae.search.node_hold), so no worker is removed as idle, with its
    activation cache, while a later stage will need it; released when the search ends.
    --no-keep-nodes lets idle nodes go between stages (fewer idle node-hours, a rebuilt
    cache on each relaunched node)."""
    report: bool = True
    """Write report.html at the end (--no-report skips it)."""
    wandb: str | None = field(default=None, metadata={"const": "raysae"})
    """Log every trial to Weights & Biases in this project (--wandb alone: project raysae),
    one run per trial grouped by search and stage; offline in RESULTS/wandb when no API key
    is set (upload later with `wandb sync`)."""
    monitor: bool = False
    """Start Prometheus on 127.0.0.1 (a free port) scraping this job's Ray, print its URL,
    stop it when the job ends (needs a `prometheus` binary: apt-get install prometheus)."""
