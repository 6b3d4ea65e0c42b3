"""A results folder's SAEs as SAEBench "core" eval JSONs, each with its SAELens folder.

Why: SAEBench is where SAEs are compared; writing raysae's numbers under SAEBench's metric
names and JSON layout lets its tooling (and readers who know its names) take raysae's SAEs
without a second, differently defined evaluation. The SAELens folder copied beside each JSON
lets SAEBench's own evals run on the same SAE later.

Source read: github.com/adamkarvonen/SAEBench at commit
8042bb3828c6340da8d12062324e92b2077c571c: ``sae_bench/evals/core/eval_output.py`` (metric
names and categories), ``sae_bench/evals/core/main.py`` (how each is computed,
``get_sparsity_and_variance_metrics``, ``get_downstream_reconstruction_metrics``,
``calculate_misc_metrics``, ``save_single_eval_result``) and
``sae_bench/evals/base_eval_output.py`` (the top-level keys).

Only a metric raysae measured is written (``SAEBENCH_CORE_METRICS``); one raysae does not
compute, or whose value is NaN, is left out, never null or -1, and an empty category is
dropped (as ``run_evals`` drops empty groups). So a file does not validate against
SAEBench's pydantic ``CoreEvalOutput``, which requires every metric: filling the gaps would
mean inventing numbers. raysae's own row (its names, its definitions) sits under
``eval_result_unstructured["raysae"]``.

Where the definitions differ (raysae's are in ``raysae.core.metrics`` and
``raysae.evaluation.spliced_ce``):

- Token set: raysae evaluates on the search's held-out blocks, not SAEBench's
  openwebtext batches; the first position of each block (BOS) keeps its clean activation and
  reconstruction metrics skip it (much as SAEBench's ``exclude_special_tokens_from_reconstruction``
  does for BOS/EOS/PAD). CE is the mean over predicted positions 1..ctx-1.
- ``explained_variance`` = 1 - raysae's ``fvu`` = 1 - sum ||x - x_hat||^2 /
  sum ||x - mean(x)||^2, the pooled (batch) variance over all held-out tokens: the
  fraction of variance explained that SAEBench's field describes. SAEBench's code divides the
  mean residual by E||x||^2 - (E||x||^2 / d_in)^2 (its ``mean_act_per_dimension`` holds
  mean squares, not means), which equals raysae's denominator E||x||^2 - ||E x||^2 only
  when ||E x|| = E||x||^2 / d_in; numbers from the two can differ.
- ``cossim``, ``l2_ratio``: per-token means, as SAEBench's; raysae guards a zero norm with
  eps 1e-12 (SAEBench: NaN for cossim; ||x|| < 1e-4 replaced by 1 for l2_ratio).
- ``l0``: raysae counts f > 0, SAEBench f != 0; the same for raysae's kinds, whose codes
  are non-negative.
- ``frac_alive`` = 1 - ``dead_fraction``: features firing at least once over the trial's
  ``feature_tokens`` activation-cache rows (SAEBench: over its sparsity/variance batches).

Left out: ``kl_div_*`` (raysae does not compute KL), ``explained_variance_legacy`` (a mean
of per-token ratios; not computed), ``mse`` (SAEBench's is the per-token squared-error sum
divided by the batch's token count, raysae's the per-element mean: different quantities),
``l2_norm_in``/``l2_norm_out``/``relative_reconstruction_bias``/``l1`` (not computed),
``token_stats`` (not recorded per SAE), the feature-frequency and max-cosine
``misc_metrics`` and the per-feature ``eval_result_details`` (not in trials.parquet).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raysae.core.metrics import metric_names
from raysae.core.sae import CONFIG_FILE, read_sae_config
from raysae.results import contract
from raysae.results.vocabulary import Status
from raysae.settings import UserError

FORMATS = ("saebench",)
"""Export formats ``export_results`` writes."""
EXPORT_DIR = "export"
"""Under the results folder: the default home of every export, one folder per format."""
EVAL_TYPE_ID = "core"
NOT_SAVED = (Status.ERROR, Status.DIVERGED, Status.STOPPED)
"""Trial statuses whose SAE was never saved: no JSON for them."""


@dataclass(frozen=True)
class Mapped:
    """One SAEBench core metric filled from one trials.parquet column."""

    category: str
    """SAEBench's category under ``eval_result_metrics``."""
    name: str
    """SAEBench's metric name in that category."""
    column: str
    """The trials.parquet column it comes from."""
    one_minus: bool = False
    """The value is 1 - column (fvu -> explained variance, dead -> alive fraction)."""


SAEBENCH_CORE_METRICS: tuple[Mapped, ...] = (
    Mapped("model_performance_preservation", "ce_loss_score", "ce_recovered"),
    Mapped("model_performance_preservation", "ce_loss_with_ablation", "ce_zero"),
    Mapped("model_performance_preservation", "ce_loss_with_sae", "ce_sae"),
    Mapped("model_performance_preservation", "ce_loss_without_sae", "ce_clean"),
    Mapped("reconstruction_quality", "explained_variance", "fvu", one_minus=True),
    Mapped("reconstruction_quality", "cossim", "cos_sim"),
    Mapped("shrinkage", "l2_ratio", "l2_ratio"),
    Mapped("sparsity", "l0", "l0"),
    Mapped("misc_metrics", "frac_alive", "dead_fraction", one_minus=True),
)
"""Every metric written, SAEBench name <- raysae column, declared once. ce_loss_score is
SAEBench's (ce_ablation - ce_sae) / (ce_ablation - ce_clean) with zero ablation: raysae's
ce_recovered, the same formula over the same positions as ce_zero/ce_sae/ce_clean. The
module docstring lists the definitional differences and what is left out."""

_COMPUTE_FLAGS = {"compute_ce_loss": "model_performance_preservation",
                  "compute_variance_metrics": "reconstruction_quality",
                  "compute_l2_norms": "shrinkage",
                  "compute_sparsity_metrics": "sparsity"}
"""SAEBench's CoreEvalConfig switches, each true when its category has a metric."""
_ROW_FIELDS = ("trial_id", "experiment", "stage", "tune_trial_id", "member", "family", "label",
               "penalty", "kind", "target_l0", "seed", "lam", "status", "steps",
               "tokens_seen", "feature_tokens")


def skipped_proposals(results_dir: str | os.PathLike) -> int:
    """Proposals of a multi-fidelity search that ended at their rung (no SAE to export)."""
    trials = contract.read_trials(Path(results_dir))
    return int((trials["status"] == Status.STOPPED).sum())  # one row each: no ladder


def export_results(results_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                   fmt: str = "saebench") -> tuple[Path, list[str]]:
    """Write ``<name>.json`` and the SAELens folder ``<name>/`` for every saved SAE of a
    results folder into ``out`` (default ``RESULTS/export/<fmt>``), atomically: built in a
    temp folder beside ``out`` and renamed, replacing an earlier export. Returns (out, the
    names). Bad input raises ValueError saying what is wrong and the fix."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; pass one of {list(FORMATS)}")
    root = Path(results_dir)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder; pass the results folder a search wrote "
                         f"(it holds {contract.TRIALS_FILE})")
    trials = contract.read_trials(root)
    rows = trials[~trials["status"].isin(NOT_SAVED)]
    if rows.empty:
        raise UserError(f"{root / contract.TRIALS_FILE} has no saved SAE (statuses: "
                         f"{sorted(set(trials['status'].astype(str)))}); export a search "
                         f"with at least one finished trial")
    if "checkpoint_path" not in rows:
        raise UserError(f"{root / contract.TRIALS_FILE} lacks column 'checkpoint_path', so "
                         f"its SAEs cannot be found; re-run the search with this raysae")
    sources = {}
    for _, row in rows.iterrows():
        name = export_name(row)
        if name in sources:
            raise UserError(f"two SAEs of {root / contract.TRIALS_FILE} share the name "
                             f"{name!r}; trial_id must be unique per SAE, re-run the search")
        sources[name] = (row, sae_folder(row, root))
    missing = [f"{row['trial_id']}" for row, folder in sources.values() if folder is None]
    if missing:
        raise UserError(f"the SAE folders of {len(missing)} trial(s) ({', '.join(missing[:5])}"
                         f"{', ...' if len(missing) > 5 else ''}) are gone (trials.parquet's "
                         f"checkpoint_path, or {contract.FETCHED_DIR}/ under the results "
                         f"folder); export where the search's Tune storage is")
    dest = Path(out) if out is not None else root / EXPORT_DIR / fmt
    _check_destination(dest, root)
    search = contract.read_search_json(root)
    when = int((root / contract.TRIALS_FILE).stat().st_mtime * 1000)
    records = {name: saebench_record(row, _read_cfg(folder), search, when)
               for name, (row, folder) in sources.items()}
    _write_folder(dest, lambda tmp: _fill(tmp, sources, records))
    return dest, list(sources)


def export_name(row: pd.Series) -> str:
    """The SAE's file name: its trial_id (tune trial + member), plus its L0 target if any."""
    name = str(row["trial_id"])
    target = _number(row.get("target_l0"))
    if target is not None:
        name += f"_L0-{target:g}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def sae_folder(row: pd.Series, root: Path) -> Path | None:
    """The SAE's SAELens folder, ``<checkpoint>/sae/<member>``: the checkpoint where
    trials.parquet says, else fetched under ``RESULTS/checkpoints``; None if neither."""
    checkpoint = row.get("checkpoint_path")
    if not isinstance(checkpoint, str) or not checkpoint or "://" in checkpoint:
        return None
    member = _number(row.get("member"))
    ck = Path(checkpoint)
    for base in (ck, root / contract.FETCHED_DIR / ck.parent.name / ck.name):
        folder = base / contract.SAE_DIR / str(int(member or 0))
        if (folder / CONFIG_FILE).is_file():
            return folder
    return None


def saebench_metrics(row: pd.Series) -> dict[str, dict[str, float]]:
    """``eval_result_metrics``: SAEBench category -> name -> value, measured ones only."""
    metrics: dict[str, dict[str, float]] = {}
    for m in SAEBENCH_CORE_METRICS:
        value = _number(row.get(m.column))
        if value is not None:
            metrics.setdefault(m.category, {})[m.name] = 1.0 - value if m.one_minus else value
    return metrics


def saebench_record(row: pd.Series, sae_cfg: dict[str, Any], search: dict[str, Any],
                    when_ms: int) -> dict[str, Any]:
    """One SAE's JSON in the layout of SAEBench's CoreEvalOutput (see the module docstring)."""
    metrics = saebench_metrics(row)
    settings = (search.get("settings") or {}).get("model") or {}
    config = {"model_name": (sae_cfg.get("metadata") or {}).get("model_name")
              or settings.get("model"),
              "dataset": settings.get("corpus"), "context_size": settings.get("context_length"),
              "compute_kl": False,
              **{flag: category in metrics for flag, category in _COMPUTE_FLAGS.items()},
              "compute_featurewise_density_statistics": False,
              "compute_featurewise_weight_based_metrics": False}
    raysae = {c: _plain(row[c]) for c in dict.fromkeys((*_ROW_FIELDS, *_metric_columns()))
              if c in row and _plain(row[c]) is not None}
    eval_id = uuid.uuid5(uuid.NAMESPACE_URL,
                         f"raysae:{row.get('experiment')}:{row['trial_id']}:{when_ms}")
    return {"eval_type_id": EVAL_TYPE_ID,
            "eval_config": {k: v for k, v in config.items() if v is not None},
            "eval_id": str(eval_id),
            "datetime_epoch_millis": when_ms,
            "eval_result_metrics": metrics,
            "eval_result_details": [],
            "sae_bench_commit_hash": None,
            "sae_lens_id": None,
            "sae_lens_release_id": None,
            "sae_lens_version": None,
            "sae_cfg_dict": sae_cfg,
            "eval_result_unstructured": {"raysae": raysae}}


def _metric_columns() -> tuple[str, ...]:
    return metric_names()


def _read_cfg(folder: Path) -> dict[str, Any]:
    return read_sae_config(folder)


def _number(value: Any) -> float | None:
    """A finite float, or None (missing, NaN, inf, not a number)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _plain(value: Any) -> Any:
    """A JSON-ready scalar: ints and bools as they are, floats finite or None, strings as
    they are, anything else None."""
    if isinstance(value, (str, bool, np.bool_)):
        return value if isinstance(value, str) else bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    return _number(value)


def _check_destination(dest: Path, root: Path) -> None:
    """Refuse a destination the swap would destroy: the results folder, one of its
    parents, or any folder that is not an earlier export."""
    here, results = dest.resolve(), root.resolve()
    if here == results or here in results.parents:
        raise UserError(f"--out {dest} would replace the results folder itself; pass a "
                         f"folder of its own (default: RESULTS/{EXPORT_DIR}/saebench)")
    if not dest.exists():
        return
    if not dest.is_dir():
        raise UserError(f"--out {dest} is a file; pass a folder")
    foreign = [p.name for p in dest.iterdir()
               if not (p.is_file() and p.suffix == ".json")
               and not (p.is_dir() and (p / CONFIG_FILE).is_file())]
    if foreign:
        raise UserError(f"--out {dest} exists and is not an earlier export (it holds "
                         f"{sorted(foreign)[:3]}); pass a new folder or remove it")


def _fill(tmp: Path, sources: dict, records: dict) -> None:
    for name, (_, folder) in sources.items():
        shutil.copytree(folder, tmp / name)
        (tmp / f"{name}.json").write_text(
            json.dumps(records[name], indent=2, allow_nan=False, default=str) + "\n")


def _write_folder(dest: Path, fill) -> None:
    """Create ``dest`` with ``fill(temp_folder)`` atomically: a temp folder beside it,
    renamed into place (an earlier ``dest`` swapped out, then removed); on any failure the
    temp folder, and any parent folders made for it, are removed."""
    made = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
            os.replace(dest, old / dest.name)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break
        raise
