"""Custom Ray metrics for a running search: per-trial progress and activation harvest rates.

The metrics go through ``ray.util.metrics``, so every Ray node's metrics agent exports them to
Prometheus next to Ray's own (names gain Ray's ``ray_`` prefix: ``raysae_trial_l0`` is scraped
as ``ray_raysae_trial_l0``). Watch them with ``ray metrics launch-prometheus`` plus Grafana
(the dashboard's Metrics view embeds Grafana when ``RAY_GRAFANA_HOST`` and
``RAY_PROMETHEUS_HOST`` are set before ``ray start --head``); see docs/cluster.md.

Ray metric objects need a connected Ray worker, so they are created lazily, once per process,
on first use; outside Ray (plain unit tests, a notebook without ``ray.init``) every call here
is a no-op. A failing metric never fails a trial: the error is logged once and dropped.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

logger = logging.getLogger(__name__)

TRIAL_TAGS = ("trial_id", "family")
HARVEST_TAGS = ("model", "hook")
MEMBER_TAGS = ("trial_id", "family", "member", "target")

# name -> (kind, description, tag keys); one table so docs, code and tests agree.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "raysae_trial_l0": ("gauge", "Latest training L0 (mean active features per token).",
                        TRIAL_TAGS),
    "raysae_member_l0": ("gauge", "Latest training L0 of one member of the trial's L0 ladder.",
                         MEMBER_TAGS),
    "raysae_trial_mse": ("gauge", "Latest training reconstruction MSE.", TRIAL_TAGS),
    "raysae_trial_tokens_per_second": ("gauge", "SAE training throughput of the trial.",
                                       TRIAL_TAGS),
    "raysae_tokens_trained_total": ("counter", "Activation tokens the trial has trained on.",
                                    TRIAL_TAGS),
    "raysae_trials_finished_total": ("counter", "Trials finished, by end status.",
                                     ("family", "status")),
    "raysae_activations_harvested_total": ("counter", "Activation vectors produced by the LM.",
                                           HARVEST_TAGS),
    "raysae_harvest_tokens_per_second": ("gauge", "LM activation harvest throughput (latest).",
                                         HARVEST_TAGS),
    "raysae_harvest_batch_seconds": ("histogram", "Seconds per harvested LM batch.",
                                     HARVEST_TAGS),
}
HARVEST_SECONDS_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]

_created: dict[str, Any] = {}
_failed: set[str] = set()


def ray_connected() -> bool:
    """True inside a driver or worker connected to Ray (where ray.util.metrics works)."""
    try:
        # on use: the activation readers import this module and run without Ray
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _metric(name: str):
    """This process's metric object for ``name``, created on first use; None outside Ray."""
    if name in _created:
        return _created[name]
    if not ray_connected():
        return None
    # on use: the activation readers import this module and run without Ray
    from ray.util import metrics as rm

    kind, description, tags = METRICS[name]
    if kind == "gauge":
        obj = rm.Gauge(name, description=description, tag_keys=tags)
    elif kind == "counter":
        obj = rm.Counter(name, description=description, tag_keys=tags)
    else:
        obj = rm.Histogram(name, description=description, tag_keys=tags,
                           boundaries=HARVEST_SECONDS_BOUNDARIES)
    _created[name] = obj
    return obj


def _emit(name: str, value: Any, tags: dict[str, str]) -> None:
    """Set/increment/observe ``name`` by its kind; skips missing or non-finite values."""
    if value is None or name in _failed:
        return
    try:
        value = float(value)
        if not math.isfinite(value):
            return
        obj = _metric(name)
        if obj is None:
            return
        kind = METRICS[name][0]
        if kind == "gauge":
            obj.set(value, tags=tags)
        elif kind == "counter":
            if value > 0:
                obj.inc(value, tags=tags)
        else:
            obj.observe(value, tags=tags)
    except Exception as err:  # monitoring must never fail a trial
        _failed.add(name)
        logger.warning("metric %s disabled in this process: %s", name, err)


class TrialMetrics:
    """Gauges and counters of one trial, tagged ``trial_id`` and penalty ``family``.

    ``start_tokens`` is the trainer's token count when this process took the trial over
    (non-zero after a restore), so restored trials do not count their old tokens twice.
    ``targets``: the ladder's L0 targets in member order, for the ``target`` tag of
    ``raysae_member_l0`` (empty when not given).
    """

    def __init__(self, trial_id: str, family: str, *, start_tokens: int = 0,
                 targets: tuple[float, ...] | list[float] = ()):
        if not trial_id or not family:
            raise ValueError("TrialMetrics needs a non-empty trial_id and family")
        self.tags = {"trial_id": str(trial_id), "family": str(family)}
        self.targets = [f"{float(t):g}" for t in targets]
        self._tokens = int(start_tokens)
        self._time = time.monotonic()

    def record(self, row: dict) -> float | None:
        """Publish one training metrics row (keys ``l0``, ``mse``, ``tokens_seen``, and
        ``members_l0``: the ladder members' L0s, a list or its JSON); returns the tokens/s
        published.

        Tokens/s comes from ``row["tokens_per_second"]`` when present, else from the change in
        ``tokens_seen`` since the previous call.
        """
        now = time.monotonic()
        _emit("raysae_trial_l0", row.get("l0"), self.tags)
        _emit("raysae_trial_mse", row.get("mse"), self.tags)
        self._members(row.get("members_l0"))
        seen = row.get("tokens_seen")
        rate = row.get("tokens_per_second")
        if seen is not None:
            delta = int(seen) - self._tokens
            _emit("raysae_tokens_trained_total", delta, self.tags)
            if rate is None and delta > 0 and now > self._time:
                rate = delta / (now - self._time)
            self._tokens = int(seen)
        _emit("raysae_trial_tokens_per_second", rate, self.tags)
        self._time = now
        return rate

    def _members(self, values) -> None:
        if values is None:
            return
        try:
            values = json.loads(values) if isinstance(values, str) else list(values)
        except (TypeError, ValueError):
            return
        for i, value in enumerate(values):
            target = self.targets[i] if i < len(self.targets) else ""
            _emit("raysae_member_l0", value, {**self.tags, "member": str(i), "target": target})

    def finished(self, status: str) -> None:
        """Count this trial as finished with ``status`` (e.g. completed, diverged, error)."""
        tags = {"family": self.tags["family"], "status": str(status)}
        _emit("raysae_trials_finished_total", 1, tags)


class HarvestMetrics:
    """Harvest counters of one activation producer, tagged with ``model`` and ``hook``."""

    def __init__(self, model: str, hook: str):
        self.tags = {"model": str(model), "hook": str(hook)}

    def record(self, n_tokens: int, seconds: float) -> None:
        """Publish one harvested batch: ``n_tokens`` activation vectors in ``seconds``."""
        if n_tokens < 0 or seconds < 0:
            raise ValueError(f"n_tokens and seconds must be >= 0, got {n_tokens}, {seconds}")
        _emit("raysae_activations_harvested_total", n_tokens, self.tags)
        _emit("raysae_harvest_batch_seconds", seconds, self.tags)
        if seconds > 0:
            _emit("raysae_harvest_tokens_per_second", n_tokens / seconds, self.tags)
