"""The registry of SAE kinds: the one place that knows which kinds exist (issue #26).

Search defaults, CLI choices, the stages' references, claims, figures and the report derive
kind names, labels and styles from here, so a new kind is one registered class and no edit
elsewhere. Import these names from raysae.core.kinds: importing it registers the built-in
kinds and then the plugin modules named in ``RAYSAE_PLUGINS`` (``load_plugins``).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from raysae.core.architectures import ARCHITECTURES
from raysae.registry import Registry

SAEKind = Any
"""A registered kind: an instance of a raysae.core.kinds.SAEKind subclass (named here, not
imported, so the registry imports no kind and nothing that imports it loops back)."""

KINDS: Registry[SAEKind] = Registry("SAE kind", "kinds")
DEFAULT_KIND = "relu"
"""The kind of a config, trial or checkpoint that names none (raysae.core.kinds.ReLUKind)."""
PLUGINS_ENV = "RAYSAE_PLUGINS"
"""Comma-separated modules that register kinds (or penalties, metrics) on import; every
process that imports raysae.core.kinds imports them too, and each trial imports its driver's
list (TrialSpec.plugins), so Ray workers know the kinds the driver knows."""


def register_kind(cls: type[SAEKind]) -> type[SAEKind]:
    """Class decorator: register one instance under ``cls.name`` (registration order is
    the order of every derived list)."""
    if cls.baseline and cls.uses_penalty:
        raise TypeError(f"kind {cls.name!r}: a baseline has no penalty to search")
    if cls.saelens_architecture not in ARCHITECTURES:
        raise TypeError(f"kind {cls.name!r}: saved as architecture "
                        f"{cls.saelens_architecture!r}, which is not one of "
                        f"{tuple(ARCHITECTURES)} (raysae.core.architectures)")
    KINDS.add(cls.name, cls())
    return cls


def get_kind(name: str) -> SAEKind:
    """Look a kind up by name; the error lists the registered ones."""
    return KINDS.get_entry(name)


NO_BASELINES = "none"  # ``--baselines none``: train no baseline kind (SearchConfig)


def baseline_kinds() -> tuple[str, ...]:
    """Names of the kinds a search can train as reference frontiers (--baselines)."""
    return tuple(name for name, kind in KINDS.items() if kind.baseline)


def default_baselines() -> tuple[str, ...]:
    """The baseline kinds a search trains when --baselines is not given (those whose class
    keeps ``in_default_search``; the others are one flag away)."""
    return tuple(name for name in baseline_kinds() if KINDS[name].in_default_search)


def penalty_kinds() -> tuple[str, ...]:
    """Names of the kinds whose penalty Optuna can propose (search --kind)."""
    return tuple(name for name, kind in KINDS.items() if kind.uses_penalty)


def kind_labels() -> dict[str, str]:
    """Kind name -> display label (a baseline's trials are labelled so)."""
    return {name: kind.label for name, kind in KINDS.items()}


def baseline_labels() -> tuple[str, ...]:
    """Labels of the baseline kinds: references in comparisons, never searched proposals."""
    return tuple(KINDS[name].label for name in baseline_kinds())


def kind_styles() -> dict[str, dict[str, Any]]:
    """Display label -> matplotlib style (color, ls, marker) of the kinds whose own class
    sets one: a subclass under a new label must not look like its parent."""
    own = {kind.label: vars(type(kind)).get("style") for kind in KINDS.values()}
    return {label: dict(style) for label, style in own.items() if style}


def plugin_modules(value: str | None = None) -> tuple[str, ...]:
    """The module names in ``RAYSAE_PLUGINS`` (or ``value``)."""
    text = os.environ.get(PLUGINS_ENV, "") if value is None else value
    return tuple(name.strip() for name in text.split(",") if name.strip())


def load_plugins(names: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Import each plugin module (default: ``RAYSAE_PLUGINS``); returns their names. A
    module imported already is not run again."""
    names = plugin_modules() if names is None else tuple(names)
    for name in names:
        importlib.import_module(name)
    return names


__all__ = ["DEFAULT_KIND", "KINDS", "PLUGINS_ENV", "baseline_kinds", "baseline_labels",
           "default_baselines", "get_kind",
           "kind_labels", "kind_styles", "load_plugins", "penalty_kinds", "plugin_modules",
           "register_kind"]
