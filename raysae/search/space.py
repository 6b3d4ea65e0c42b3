"""The search space, built from the penalty registry: what Optuna proposes and what a trial
config means.

A trial config names its penalty as ``{"penalty": NAME, "NAME.PARAM": value, ...}`` (the
family prefix keeps one family's ``eps`` apart from another's) plus ``lam`` when lambda is
searched or fixed. Optuna searches each family's parameters over their ranges (log-uniform
where the registry says ``log``); the reference penalties (the study's L1, sqrt, sqrt(sqrt))
are not proposed by Optuna but trained as a fixed grid in every search, exactly.
"""

from __future__ import annotations

from typing import Any

from raysae.core.kinds import DEFAULT_KIND
from raysae.core.penalties import get_penalty, reference_points
from raysae.search.config import SearchConfig


def param_key(penalty: str, param: str) -> str:
    return f"{penalty}.{param}"


class SearchSpace:
    """Optuna's define-by-run space. A class, not a closure: Tune pickles the searcher into
    its experiment checkpoint."""

    def __init__(self, search: SearchConfig):
        self.families = tuple(search.penalty)
        self.params = {fam: [(p.name, *search.searched_range(fam, p.name), p.log)
                             for p in get_penalty(fam).searched_params()]
                       for fam in self.families}
        self.lam_range = tuple(search.lam_range)
        self.search_lambda = search.lambda_mode == "search"
        self.kind = search.kind

    def __call__(self, trial) -> dict[str, Any]:
        family = self.families[0]
        if len(self.families) > 1:
            family = trial.suggest_categorical("penalty", list(self.families))
        for name, low, high, log in self.params[family]:
            trial.suggest_float(param_key(family, name), low, high, log=log)
        if self.search_lambda:
            trial.suggest_float("lam", *self.lam_range, log=True)
        return {"penalty": family, **({"kind": self.kind} if self.kind != DEFAULT_KIND else {})}

    def describe(self) -> list[dict[str, Any]]:
        """The proposed parameters (for search.json and the report's importances)."""
        out = [{"name": param_key(fam, n), "family": fam, "low": lo, "high": hi, "log": log}
               for fam in self.families for n, lo, hi, log in self.params[fam]]
        if self.search_lambda:
            out.append({"name": "lam", "family": None, "low": self.lam_range[0],
                        "high": self.lam_range[1], "log": True})
        return out


def reference_configs(baselines: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The reference penalties (registry order, L1 first), then the baseline SAE kinds
    (no penalty; raysae.core.kind_registry), as trial configs."""
    refs = [{"penalty": name, **{param_key(name, k): float(v) for k, v in params.items()}}
            for _label, name, params in reference_points()]
    return refs + [{"kind": kind, **refs[0]} for kind in baselines]


def penalty_of(config: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """(penalty name, its parameters) from a trial config."""
    name = config.get("penalty")
    if name is None:
        dotted = [k.split(".", 1)[0] for k in config if "." in k]
        name = dotted[0] if dotted else "power"
    prefix = f"{name}."
    return name, {k[len(prefix):]: float(v) for k, v in config.items() if k.startswith(prefix)}
