"""The job's config tree: every setting of a search or sweep, declared once.

    JobConfig
      model        ModelSettings       which LM, hook, text, SAE width
      activations  ActivationSettings  the activation cache / live stream, held-out sizes
      train        TrainConfig         the SAE's training (raysae.core.config; a template
                                       whose shape and penalty each trial fills in)
      search       SearchConfig        penalties, ranges, targets, trials, resources
      sweep        SweepSettings       the lambda grid of `raysae sweep`
      run          RunSettings         name, folders, resume, Ray address, report

Presets are sets of overrides (``PRESETS``); the CLI generates one flag per field (with the
field's docstring as help) and applies preset, then flags. ``job_config`` builds and
validates the whole tree on the driver, before Ray starts; what a config cannot check alone
(files, disks, the model and its hook, the corpus) is checked in raysae.search.preflight.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from raysae.activations.source import CacheDtype
from raysae.core.config import TrainConfig, check_targets
from raysae.core.kind_registry import NO_BASELINES
from raysae.core.kinds import (
    DEFAULT_KIND,
    baseline_kinds,
    default_baselines,
    option_fields,
    penalty_kinds,
)
from raysae.core.penalties import PENALTIES, get_penalty
from raysae.search.ranges import check_log_range, range_field, range_fields
from raysae.search.run_settings import RunSettings, SweepSettings
from raysae.settings import (
    SettingError,
    UserError,
    check_choices,
    is_int,
    is_number,
    positive_int,
    replace_fields,
    require,
)

Objective = Literal["target", "pareto"]
LambdaMode = Literal["control", "search"]
Sampler = Literal["tpe", "gp", "qmc"]
OBJECTIVES, LAMBDA_MODES = get_args(Objective), get_args(LambdaMode)


@dataclass(frozen=True)
class ModelSettings:
    """The LM, the hooked activation and the text it reads."""

    model: str | None = None
    """LM: a hub name or a local checkpoint folder; none: the locally built GPT-NeoX."""
    hook: str = "blocks.1.hook_resid_post"
    """Hook whose activations the SAEs reconstruct, e.g. blocks.3.hook_resid_post."""
    corpus: str = "stdlib"
    """Text: 'stdlib' (the Python standard library's sources), local files/folder, or a hub
    dataset name."""
    text_column: str = "text"
    """Text column of a table corpus (parquet/json/hub dataset)."""
    context_length: int = 128
    """Tokens per block fed to the LM."""
    expansion: int = 4
    """SAE width: d_sae = expansion * d_in."""

    def __post_init__(self) -> None:
        positive_int(self, "context_length")
        require(self.context_length >= 2, "context_length", self.context_length,
                "must be >= 2", "pass {context_length} 2 or more")
        require(isinstance(self.expansion, int) and self.expansion >= 1, "expansion",
                self.expansion, "d_sae = expansion * d_in must be a positive integer",
                "pass a whole number >= 1, e.g. {expansion} 4")


@dataclass(frozen=True)
class ActivationSettings:
    """Where the training activations come from and how much held-out data is evaluated."""

    cache_tokens: int = 500_000
    """Activation rows in the cache built for the search. The default is the default
    --total-tokens, so no SAE sees a row twice (SAEs fit repeated rows and their held-out
    L0 overshoots the target)."""
    cache: str | None = None
    """Use this existing activation cache folder (checked against the model, hook and
    context length) instead of building one."""
    cache_dtype: CacheDtype = "float32"
    """Storage dtype of the activation cache."""
    cache_wait_seconds: float = 7200.0
    """On a cluster the first trial on each node builds the node's cache on its own GPU
    share; the node's other trials wait for it at most this long, then fail naming the
    lock file."""
    live: bool = False
    """No cache: each trial runs the model on its own device and streams activations as it
    trains, each epoch the corpus's next cache_tokens tokens."""
    eval_blocks: int = 64
    """Held-out token blocks for the spliced CE of every SAE."""
    feature_tokens: int = 25_000
    """Activation rows read for each SAE's feature statistics."""

    def __post_init__(self) -> None:
        positive_int(self, "cache_tokens", "eval_blocks", "feature_tokens")
        require(is_number(self.cache_wait_seconds) and self.cache_wait_seconds > 0,
                "cache_wait_seconds", self.cache_wait_seconds, "must be a number > 0")
        check_choices(self)
        if self.cache and self.live:
            raise SettingError("cache", self.cache, "{cache} and {live} exclude each other: "
                               "{live} streams activations instead of reading a cache",
                               "drop one of them")


@dataclass(frozen=True)
class SearchConfig:
    """What Optuna searches, against which targets, with how many trials and resources."""

    penalty: tuple[str, ...] = ("power",)
    """Penalty families to search (registry names); several: Optuna chooses the family too.
    The study's references (L1, sqrt, sqrt(sqrt)) are trained in every search."""
    kind: str = DEFAULT_KIND
    """SAE kind of Optuna's proposals, one that uses a penalty: relu (the penalty as is),
    panneal (the power family with p annealed from 1 to the proposed p; raysae.core.kinds)."""
    baselines: tuple[str, ...] = field(default_factory=default_baselines)
    """SAE kinds trained as reference frontiers on the same ladder and seeds (default: those
    with ``in_default_search``, TopK and BatchTopK; JumpReLU, Matryoshka: one flag; ``none``)."""
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Searched range per family and parameter, keyed "family.param" (flags
    --FAMILY-PARAM-range LOW HIGH, e.g. --power-eps-range); default: the registry's."""
    objective: Objective = "target"
    """target: CE at each target L0 (one Optuna study per target); pareto: minimise
    [ce_sae, l0] (needs lambda_mode search)."""
    lambda_mode: LambdaMode = "control"
    """control: a feedback controller drives L0 to the target; search: Optuna searches lambda."""
    targets: tuple[float, ...] = (4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
    """The L0 ladder: every trial trains one SAE per target, each driven to it."""
    num_trials: int = 12
    """Trials Optuna proposes besides the references (each a whole ladder, to ``rung``)."""
    rung: float = 0.125
    """Multi-fidelity: each proposal's ladder is scored (the search's objective, held-out)
    at this fraction of the token budget, and stopped there as ``promote`` says
    (raysae.search.multifidelity). References and confirmations always train to the full budget;
    0 (the default with objective pareto): proposals do too. The default is the earliest
    rung whose score ranked proposals like their final one in benchmarks/rung_correlation.py
    (findings/benchmarks/rung_correlation.json)."""
    promote: int = 2
    """With ``rung``: K > 0 is successive halving, every proposal stops at the rung and the
    K best there are trained to the full budget (stage ``promote``; the search's cost is
    fixed: ``num_trials`` rungs and K full ladders; no more proposals than K: no rung);
    0 is Ray Tune's ASHA (reduction factor 1 / rung): a proposal goes on when it is in
    the best 1 / rung scored so far."""
    rung_trace: tuple[float, ...] = ()
    """More fractions of the budget where each proposal reports that score unstopped (in
    its Tune results): what benchmarks/rung_correlation.py chooses ``rung`` from."""
    sampler: Sampler = "tpe"
    """Optuna's sampler of the proposals: tpe (TPESampler, its random start-up a third of
    ``num_trials``, at least 2), gp (GPSampler, a Gaussian process, same start-up), qmc
    (QMCSampler: scrambled Sobol points, no model). Seeded from the search's seed."""
    seeds: int = 4
    """Confirmation stage: retrain the best proposals and the references with this many
    seeds in all (paired: same init and data order per seed), so a searched winner is
    judged on seeds - 1 fresh seeds (3 by default: the replicate that chose it never
    counts); 0 or 1 turns it off."""
    confirm_best: int = 1
    """How many of the best proposals (by the search objective) the confirmation retrains."""
    budget_check: float = 0.0
    """After the confirmation, retrain the references and the best proposal with this many
    times the training tokens (fresh tokens: the cache grows to match), paired seeds as in
    the confirmation; the report says whether each claim keeps its sign and significance.
    0: off."""
    lam_range: tuple[float, float] = (1e-2, 1e2)
    """Lambda range, log scale: searched with lambda_mode search; the sweep's grid."""
    beta: float = 1.0
    """Objective weight of missing the target L0 (nats per unit |ln(l0/target)|)."""
    tol: float = 0.15
    """Relative L0 miss that costs nothing in the objective."""
    max_concurrent: int | None = None
    """Trials running at once (default: as many as fit on the cluster at its largest, the
    autoscaler's node types included; see capacity.default_concurrency)."""
    cpus_per_trial: float = 1.0
    """CPU share per trial; fractions (e.g. 0.25) let more trials share a core."""
    gpus_per_trial: float | None = None
    """GPU share per trial (default: 0.25 when the cluster has GPUs or its autoscaler can
    launch GPU nodes, else 0)."""
    gpu_memory_gib: float | None = None
    """Memory of one GPU of the cluster's GPU nodes, GiB, for the check before any work that
    a trial's GPU share holds its SAEs (default: from each autoscaler node type's EC2
    InstanceType, raysae.search.gpu_memory; other node types are not checked)."""
    max_failures: int = 2
    """Retries of a failed trial, from its last checkpoint."""

    def __post_init__(self) -> None:
        for name in self.penalty:
            require(name in PENALTIES, "penalty", name, f"registered penalties: "
                    f"{sorted(PENALTIES)}", "pass {penalty} with registered names")
        require(self.kind in penalty_kinds(), "kind", self.kind, "Optuna proposes penalties "
                f"for kinds that use one: {list(penalty_kinds())}", "pass one of them")
        if tuple(self.baselines) == (NO_BASELINES,):
            object.__setattr__(self, "baselines", ())
        for name in self.baselines:
            require(name in baseline_kinds(), "baselines", name, "baselines are registered "
                    f"baseline kinds: {list(baseline_kinds())}", f"pass some, or {NO_BASELINES}")
        check_choices(self)
        if self.objective == "pareto" and self.lambda_mode == "control":
            raise SettingError("objective", "pareto", "needs {lambda_mode} search: lambda "
                               "must vary to trace a frontier", "add {lambda_mode} search")
        positive_int(self, "num_trials", "confirm_best")
        if self.max_concurrent is not None:
            positive_int(self, "max_concurrent")
        require(is_int(self.seeds) and self.seeds >= 0, "seeds", self.seeds,
                "must be an integer >= 0", "pass e.g. {seeds} 3 (0 turns it off)")
        require(is_number(self.rung) and 0 <= self.rung <= 0.5, "rung", self.rung,
                "must be 0 (off) or a fraction of the token budget in (0, 0.5]",
                "pass e.g. {rung} 0.125")
        for value in self.rung_trace:
            require(is_number(value) and 0 < value < 1, "rung_trace", value,
                    "must be fractions of the token budget in (0, 1)",
                    "pass e.g. {rung_trace} 0.0625 0.25 0.5")
        if self.rung and self.objective == "pareto":
            raise SettingError("rung", self.rung, "a rung ranks proposals on one score; "
                               "{objective} pareto has two", "pass {rung} 0")
        require(is_int(self.promote) and self.promote >= 0, "promote", self.promote,
                "must be an integer >= 0", "pass e.g. {promote} 2 (0: ASHA decides)")
        require(self.max_failures >= 0, "max_failures", self.max_failures, "must be >= 0")
        require(is_number(self.budget_check) and (self.budget_check == 0
                                                  or self.budget_check > 1),
                "budget_check", self.budget_check, "must be 0 (off) or a factor > 1",
                "pass e.g. {budget_check} 2")
        check_targets(self.targets)  # against d_sae once the model is known (preflight)
        require(is_number(self.beta) and self.beta >= 0, "beta", self.beta,
                "must be a number >= 0", "pass e.g. {beta} 1")
        require(is_number(self.cpus_per_trial) and self.cpus_per_trial > 0, "cpus_per_trial",
                self.cpus_per_trial, "must be > 0", "pass a CPU share such as 1 or 0.25")
        require(self.gpus_per_trial is None or (is_number(self.gpus_per_trial)
                                                and self.gpus_per_trial >= 0),
                "gpus_per_trial", self.gpus_per_trial, "must be >= 0",
                "pass a GPU share such as 0.25")
        require(self.gpu_memory_gib is None or (is_number(self.gpu_memory_gib)
                                                and self.gpu_memory_gib > 0),
                "gpu_memory_gib", self.gpu_memory_gib, "must be a number of GiB > 0",
                "pass one GPU's memory, e.g. {gpu_memory_gib} 24")
        check_log_range("lam_range", self.lam_range, "lambda")
        for name, pair in self.ranges.items():
            self._check_param_range(name, tuple(pair))

    def _check_param_range(self, key: str, pair: tuple[float, float]) -> None:
        family, _, name = key.partition(".")
        flag = range_field(family, name)
        require(family in self.penalty, flag, pair, f"penalty {family!r} is not searched "
                f"(searched: {', '.join(self.penalty)})",
                "drop it or add the family to {penalty}")
        param = get_penalty(family).param(name)
        for end, value in zip(("LOW", "HIGH"), pair):
            require(param.contains(value), flag, f"{end} = {value:g}",
                    f"{name} of penalty {family!r} must be in {param.range_text()}",
                    f"pass {{{flag}}} LOW HIGH inside that range")
        if param.log:
            check_log_range(flag, pair, name)
        require(pair[0] <= pair[1], flag, pair, "LOW is above HIGH",
                f"pass {{{flag}}} LOW HIGH with LOW <= HIGH")

    def searched_range(self, penalty: str, param: str) -> tuple[float, float]:
        """The range Optuna searches for one parameter of one family."""
        return tuple(self.ranges.get(f"{penalty}.{param}",
                                     get_penalty(penalty).param(param).search))


@dataclass(frozen=True)
class JobConfig:
    """One search or sweep, whole."""

    preset: str = "local"
    """Experiment setting: 'local' (offline local model and stdlib text) or 'pythia-70m'
    (the study: Pythia-70M-deduped, layer 3 resid, 4x SAE, the Pile)."""
    model: ModelSettings = field(default_factory=ModelSettings)
    activations: ActivationSettings = field(default_factory=ActivationSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    sweep: SweepSettings = field(default_factory=SweepSettings)
    run: RunSettings = field(default_factory=RunSettings)

    def __post_init__(self) -> None:
        require(self.preset in PRESETS, "preset", self.preset, f"allowed {sorted(PRESETS)}",
                "pass one of them")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TRAIN_INTERNAL = ("sae", "penalty", "kind", "adam_betas", "normalize_activations",
                  "activation_scale", "l0_target", "device")
"""TrainConfig fields each trial sets itself: not job settings (and not flags)."""
SECTIONS = {"model": ModelSettings, "activations": ActivationSettings, "train": TrainConfig,
            "search": SearchConfig, "sweep": SweepSettings, "run": RunSettings}

PRESETS: dict[str, dict[str, Any]] = {
    "local": {},
    "pythia-70m": {
        "model": "EleutherAI/pythia-70m-deduped", "hook": "blocks.3.hook_resid_post",
        "corpus": "monology/pile-uncopyrighted", "cache_tokens": 400_000_000,
        "cache_dtype": "float16", "eval_blocks": 256, "feature_tokens": 1_000_000,
        "total_tokens": 400_000_000,
        "batch_size": 4096, "targets": (8.0, 16.0, 32.0, 64.0, 128.0, 256.0),
        "num_trials": 16,
        "n_lambdas": 15},
}
SWEEP_DEFAULTS = {"lam_range": (0.3, 10.0)}
"""The sweep's own defaults: lambdas giving L0 ~ 5-100 on the local default."""


def job_config(preset: str = "local", *, sweep: bool = False, **overrides: Any) -> JobConfig:
    """Defaults, then the preset's overrides, then ``overrides`` (field name -> value; None
    means "not given"; ``<family>_<param>_range`` sets a searched range). Validated whole."""
    require(preset in PRESETS, "preset", preset, f"allowed {sorted(PRESETS)}",
            "pass one of them")
    values = {**(SWEEP_DEFAULTS if sweep else {}), **PRESETS[preset],
              **{k: v for k, v in overrides.items() if v is not None}}
    if values.get("objective") == "pareto":
        values.setdefault("rung", 0.0)  # a rung ranks one score (SearchConfig.rung)
    known = {f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
    searchable, options = range_fields(), option_fields()
    ranges = {searchable[k]: tuple(v) for k, v in values.items() if k in searchable}
    unknown = sorted(k for k in values if k not in known | set(searchable) | set(options))
    if unknown:
        raise UserError(f"unknown setting(s) {unknown}; see raysae.search.config")
    if ranges:
        values["ranges"] = ranges
    for key in [k for k in values if k in options]:
        kind, option = options[key]
        value = values.pop(key)
        kinds = values.setdefault("kind_options", {})
        kinds.setdefault(kind, {})[option] = tuple(value) if isinstance(value, list) else value
    train_values = {k: v for k, v in values.items() if k not in TRAIN_INTERNAL}
    sections = {name: replace_fields(cls(), train_values if name == "train" else values)
                for name, cls in SECTIONS.items()}
    return JobConfig(preset=preset, **sections)
