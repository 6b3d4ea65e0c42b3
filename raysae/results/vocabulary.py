"""One vocabulary of a search's statuses and stages, as trials.parquet and the report say
them: the search's trials write these, the driver and the analysis read them, by name.

Both are ``StrEnum``s: a member is its string (``Status.FINISHED == "finished"``), so the
tables hold plain strings and compare with them.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """How a trial, or one SAE of its ladder, ended (column ``status``)."""

    FINISHED = "finished"
    """Trained its whole budget; evaluated and saved."""
    PARTIAL = "partial"
    """A ladder some of whose members finished and others did not."""
    DIVERGED = "diverged"
    """Its loss or weights became non-finite; not saved, scored as a bad objective."""
    DATA_EXHAUSTED = "data_exhausted"
    """The activation stream ended before the budget; saved as it stood."""
    STOPPED = "stopped"
    """Ended at its rung by the search's policy (successive halving or ASHA); keeps its
    rung score, no SAE."""
    ERROR = "error"
    """Failed (an exception no retry healed); the reason in ``status_reason``."""
    RUNNING = "running"
    """Still training (a training report, never a final row)."""


EVALUATED = (Status.FINISHED, Status.PARTIAL)
"""Statuses of a trial whose SAEs were evaluated: the search has a result."""
SAVED = (Status.FINISHED, Status.PARTIAL, Status.DATA_EXHAUSTED)
"""Statuses of an SAE that is saved in its trial's final checkpoint."""


class Stage(StrEnum):
    """A search's stages, each one Tune experiment (column ``stage``;
    raysae.search.stages says what each does)."""

    REFS = "refs"
    SEARCH = "search"
    PROMOTE = "promote"
    CONFIRM = "confirm"
    BUDGET = "budget"
    GRID = "grid"
    """A sweep's one stage (`raysae sweep`)."""


SELECTION_STAGES = (Stage.SEARCH, Stage.PROMOTE)
"""Rows of these stages are the replicate that chose a searched proposal (its seed 0): the
search stage, and successive halving's promotion of the best at the rung; a claim about a
proposal never rests on them when fresh seeds exist (raysae.analysis.confidence)."""
