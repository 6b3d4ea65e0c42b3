"""The searched ranges as settings: one per family and parameter of the penalty registry
(``--FAMILY-PARAM-range LOW HIGH``), named and checked here for SearchConfig."""

from __future__ import annotations

from raysae.core.penalties import PENALTIES
from raysae.settings import is_number, require


def range_field(family: str, param: str) -> str:
    """The setting (and, as --family-param-range, the flag) of one searched range."""
    return f"{family}_{param}_range"


def range_fields() -> dict[str, str]:
    """Every searchable range setting -> its "family.param" key, from the registry."""
    return {range_field(spec.name, p.name): f"{spec.name}.{p.name}"
            for spec in PENALTIES.values() for p in spec.searched_params()}


def check_log_range(field_name: str, pair, what: str) -> None:
    """Both ends > 0 and LOW <= HIGH: the range is searched on a log scale."""
    require(all(is_number(v) and v > 0 for v in pair), field_name, pair,
            f"{what} is searched on a log scale, so both ends must be > 0",
            f"pass {{{field_name}}} LOW HIGH with 0 < LOW <= HIGH")
    require(pair[0] <= pair[1], field_name, pair, "LOW is above HIGH",
            f"pass {{{field_name}}} LOW HIGH with LOW <= HIGH")
