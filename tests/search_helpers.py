"""Small builders of TrialSpec / SearchPlan for the search tests (flat keyword arguments)."""

from __future__ import annotations

from raysae.core.config import SAEConfig, TrainConfig
from raysae.search.config import ActivationSettings, ModelSettings, SearchConfig
from raysae.search.run_settings import RunSettings
from raysae.search.trial.spec import TrialSpec
from raysae.search.tune_setup import SearchPlan

TRAIN_KEYS = ("total_tokens", "batch_size", "lr", "lam", "log_every", "seed")
SECTION_KEYS = {"lm": (ModelSettings, ("hook", "context_length", "corpus")),
                "data": (ActivationSettings, ("eval_blocks", "feature_tokens",
                                              "cache_wait_seconds")),
                "search": (SearchConfig, ("beta", "tol")),
                "run": (RunSettings, ("checkpoint_seconds",))}
"""Flat keywords of make_spec -> the config section of TrialSpec that declares them."""


def make_spec(*, d_in: int, d_sae: int, **kw) -> TrialSpec:
    """A TrialSpec whose training template has the given shape and training keywords, and
    whose config sections hold the given section keywords (SECTION_KEYS)."""
    train = {k: kw.pop(k) for k in TRAIN_KEYS if k in kw}
    for name, (cls, keys) in SECTION_KEYS.items():
        given = {k: kw.pop(k) for k in keys if k in kw}
        if given:
            kw[name] = cls(**given)
    return TrialSpec(train=TrainConfig(sae=SAEConfig(d_in, d_sae), **train), **kw)


def make_plan(name: str, storage: str, spec: TrialSpec, grid=(), **search) -> SearchPlan:
    """A SearchPlan; a grid's points may be written as {p, eps, lam} (power family)."""
    points = tuple(point if "penalty" in point else
                   {"penalty": "power", **{f"power.{k}": v for k, v in point.items()
                                           if k != "lam"},
                    **({"lam": point["lam"]} if "lam" in point else {})}
                   for point in grid)
    search.setdefault("gpus_per_trial", 0.0)
    search.setdefault("rung", 0.0)  # proposals to the full budget unless a test asks
    search.setdefault("max_concurrent", 2)
    search.setdefault("targets", tuple(spec.targets) or (8.0,))
    return SearchPlan(name=name, storage=storage, search=SearchConfig(**search), spec=spec,
                      grid=points)


def use_plugin(monkeypatch, module: str):
    """Name a module of tests/ in RAYSAE_PLUGINS (as a user would: trial workers import it
    too) and import it here; returns the module."""
    import importlib
    from pathlib import Path

    from raysae.core import kind_registry

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    monkeypatch.setenv(kind_registry.PLUGINS_ENV, module)
    return importlib.import_module(module)


RUN_COLUMNS = ("trial_id", "tune_trial_id", "trial_dir", "checkpoint_path", "node_id",
               "gpu_ids", "restored_from_step", "restored_from_tokens", "checkpoint_bytes",
               "tokens_per_second", "train_tokens_per_second", "iterations_since_restore",
               "training_iteration", "experiment_tag", "status_reason", "checkpoint_dir_name")
"""Columns of trials.parquet that describe a run (ids, paths, nodes, times, attempts), not
what was trained: they may differ between an interrupted run and an uninterrupted one."""


def assert_same_trials(got, want, *, tol: float = 1e-6, keys=("stage", "label", "seed",
                                                                "target_l0")) -> None:
    """Two trials tables hold the same SAEs with the same results: every column but the
    run's own (``RUN_COLUMNS``, ``*_seconds``) equal, numbers to ``tol`` (relative and
    absolute), rows matched by ``keys``."""
    import numpy as np
    import pandas as pd

    def key(df):
        return df.sort_values(list(keys)).reset_index(drop=True)

    got, want = key(got), key(want)
    assert len(got) == len(want), (len(got), len(want))
    columns = [c for c in want.columns if c not in RUN_COLUMNS and not c.endswith("_seconds")]
    assert set(columns) <= set(got.columns), set(columns) - set(got.columns)
    for col in columns:
        a, b = got[col], want[col]
        if pd.api.types.is_numeric_dtype(b) and not pd.api.types.is_bool_dtype(b):
            np.testing.assert_allclose(a.to_numpy(float), b.to_numpy(float), rtol=tol,
                                       atol=tol, equal_nan=True, err_msg=col)
        elif b.map(lambda v: isinstance(v, (list, np.ndarray))).any():
            for x, y in zip(a, b, strict=True):
                np.testing.assert_allclose(np.asarray(x, float), np.asarray(y, float),
                                           rtol=tol, atol=tol, err_msg=col)
        else:
            assert a.astype(str).tolist() == b.astype(str).tolist(), col
