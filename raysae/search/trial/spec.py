"""What one trial is: the TrialSpec every trial of a search shares, the trial's TrainConfig
(the spec's template plus the proposed penalty, kind, lambda and seed) and the objective.

A trial is one penalty configuration and one seed. In control mode it trains one SAE per
target on the L0 ladder (``targets``), each member's lambda driven to its target by its own
controller, all on the same activation batches (raysae.core.ladder). In search and fixed
modes it trains one SAE with the proposed (or grid) lambda.

The objective Optuna minimises (one number per trial, the whole frontier):

    score = mean over the ladder of [ce_sae_k + beta * max(0, |ln(l0_k / t_k)| - ln(1 + tol))]
            - mean over the ladder of ce_sae of the L1 reference at the same targets

(the second term only when the L1 reference has been trained, which every search does
first; it is one constant per search, so it changes no ranking: it makes the score read as
"nats better (< 0) or worse than L1, averaged over the ladder"). A diverged member counts
as ``BAD_OBJECTIVE`` nats.
The spec carries the job's config sections a trial reads (``lm``, ``data``, ``search``,
``run``), never copies of their fields: each setting is declared once, in
raysae.search.config / run_settings.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch

from raysae.core.config import PenaltyConfig, TrainConfig, check_targets
from raysae.core.kind_registry import plugin_modules
from raysae.search.config import ActivationSettings, ModelSettings, SearchConfig
from raysae.search.run_settings import RunSettings
from raysae.search.space import penalty_of
from raysae.settings import check_choices

BAD_OBJECTIVE = 1e3
TrialLambdaMode = Literal["control", "search", "fixed"]
"""A search's lambda modes (raysae.search.config.LambdaMode), and the sweep's fixed lambda
(each trial one given lambda)."""


@dataclass(frozen=True)
class TrialSpec:
    """What every trial of one search shares; the searcher varies only the penalty (family
    and parameters), the SAE kind, the seed and, in search mode, lambda."""

    activations: str | dict
    """Activation cache folder, or a JSON-able ActivationSource dict (live streaming)."""
    model: str
    """The resolved LM: hub name or checkpoint folder (the locally built model's folder when
    ``lm.model`` is None), for the held-out CE."""
    train: TrainConfig
    """The training template (shape set); a trial fills in penalty, lambda, seed."""
    lm: ModelSettings = field(default_factory=ModelSettings)
    """The job's LM section: the hook, and the corpus and context length of the held-out
    blocks."""
    data: ActivationSettings = field(default_factory=ActivationSettings)
    """The job's activation section: held-out blocks, feature-statistics rows, how long a
    trial waits for its node's cache builder."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """The job's search section: the objective's ``beta`` and ``tol``."""
    run: RunSettings = field(default_factory=RunSettings)
    """The job's run section: ``checkpoint_seconds``."""
    activation_source: dict | None = None
    """The ActivationSource the cache was built from: a node that lacks the cache folder
    (a fresh cluster worker) builds it from this, once per node (file-locked)."""
    lambda_mode: TrialLambdaMode = "control"
    """control: each member's controller drives its L0 to its target; search: Optuna
    proposes lambda; fixed: lambda comes from the trial config (grid sweeps)."""
    targets: tuple[float, ...] = ()
    """The L0 ladder (control mode): one SAE per target."""
    reference_ce: tuple[float, ...] | None = None
    """The L1 reference's ce_sae per target, once known (subtracted in the score)."""
    rung_tokens: tuple[int, ...] = ()
    """Token counts at which this stage's trials score their ladder on held-out text and
    report it as ``rung_objective`` (the search stage's ``search.rung`` and
    ``search.rung_trace``); none elsewhere: references and confirmations are never scored
    early."""
    stop_tokens: int = 0
    """Successive halving's search stage: the trial ends once it has scored its rung at this
    many tokens (raysae.search.multifidelity.halving_stop); 0: it trains to the full budget."""
    threshold_sweep: bool = False
    sweep_points: int = 10
    plugins: tuple[str, ...] = field(default_factory=plugin_modules)
    """Modules each trial imports first (the driver's RAYSAE_PLUGINS): the kinds,
    penalties and metrics they register exist in every trial's worker too."""
    torch_threads: int = 1
    inject_failure_at_step: int | None = None
    """Fault injection for reliability tests: fail once at this step (first attempt only)."""
    inject_failure_kind: Literal["raise", "sigkill"] = "raise"
    """raise: a Python exception; sigkill: the trial's worker process SIGKILLs itself."""

    def __post_init__(self) -> None:
        if self.train.sae is None:
            raise ValueError("TrialSpec.train.sae is None: set the SAE shape before the search")
        check_choices(self)
        if self.lambda_mode == "control" and not self.targets:
            raise ValueError("lambda_mode 'control' needs targets: give the L0 ladder")
        if self.targets:
            check_targets(self.targets, self.train.sae.d_sae)

    @property
    def ladder(self) -> tuple[float | None, ...]:
        """The members' targets: the ladder in control mode, one untargeted SAE otherwise."""
        return tuple(self.targets) if self.lambda_mode == "control" else (None,)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def member_objective(ce_sae: float, l0: float, target_l0: float | None, beta: float,
                     tol: float) -> float:
    """ce_sae + beta * max(0, |ln(l0 / target)| - ln(1 + tol)); just ce_sae without a target."""
    if not (math.isfinite(ce_sae) and math.isfinite(l0)):
        return BAD_OBJECTIVE
    if target_l0 is None or not math.isfinite(target_l0):
        return ce_sae
    miss = abs(math.log(max(l0, 1e-3) / target_l0)) - math.log(1 + tol)
    return ce_sae + beta * max(0.0, miss)


objective = member_objective  # the per-SAE objective (search and fixed modes)


def frontier_score(rows: list[dict[str, Any]], spec: TrialSpec) -> float:
    """The trial's score over its members (module doc)."""
    beta, tol = spec.search.beta, spec.search.tol
    values = [min(member_objective(r.get("ce_sae", math.nan), r.get("l0", math.nan),
                                   r.get("target_l0"), beta, tol), BAD_OBJECTIVE)
              for r in rows]
    score = sum(values) / len(values)
    if spec.reference_ce and len(spec.reference_ce) == len(values) and score < BAD_OBJECTIVE:
        score -= sum(spec.reference_ce) / len(spec.reference_ce)
    return score


def train_config(spec: TrialSpec, config: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of one trial: the spec's template plus the proposed penalty, kind,
    seed and lambda. In control mode each member's lambda starts at lam / rho(1) (so the
    penalty's own scale does not set the controller's start); otherwise lambda is the
    proposed one, fixed (control_frac 0)."""
    config = flatten_config(config)
    name, params = penalty_of(config)
    penalty = PenaltyConfig(name, params)
    lam = float(config.get("lam", spec.train.lam))
    kind = {"kind": config["kind"]} if "kind" in config else {}
    cfg = replace(spec.train, penalty=penalty, lam=lam, seed=int(config.get("seed", 0))
                  + spec.train.seed, device=trial_device(), **kind)
    return cfg if spec.lambda_mode == "control" else replace(cfg, control_frac=0.0)


def trial_device() -> str:
    """CUDA when the trial was given a GPU (Tune sets CUDA_VISIBLE_DEVICES), else CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def flatten_config(config: dict[str, Any]) -> dict[str, Any]:
    """Grid searches nest a trial's values under "point"; searchers give them flat."""
    return {**config.get("point", {}), **{k: v for k, v in config.items() if k != "point"}}
