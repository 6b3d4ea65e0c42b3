"""The machinery of raysae's one config tree: documented dataclass fields and their errors.

A setting is one dataclass field with one default and a docstring right below it (read here
with ``field_docs``, so the CLI's flags and help come from the same place). Validation lives
in each config's ``__post_init__`` and raises ``SettingError``, whose message is a template
naming fields as ``{field_name}``: rendered for Python callers as the field name and for the
command line as the flag (``--batch-size``), so one check serves both.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import re
import textwrap
import types
import typing
from collections.abc import Callable
from typing import Any

_FIELD = re.compile(r"\{(\w+)\}")


class UserError(ValueError):
    """Bad input the user can fix (a setting, a file, a model, a cluster that can never run
    a trial, a resume with nothing to resume): the CLI prints its message as one line and
    exits 2. Any other exception is a bug and keeps its traceback (raysae.cli)."""


class JobFailed(RuntimeError):
    """A job ran but produced nothing (no trial finished): the CLI prints the cause as one
    line and exits 1."""


class SettingError(UserError):
    """A setting out of range: ``{field} {value} is invalid: {allowed}; {fix}``."""

    def __init__(self, field: str, value: Any, allowed: str, fix: str = ""):
        self.field, self.value, self.allowed, self.fix = field, value, allowed, fix
        super().__init__(self.render(lambda name: name))

    def render(self, name_of: Callable[[str], str]) -> str:
        """The message with every ``{field}`` replaced by ``name_of(field)``."""
        sub = lambda text: _FIELD.sub(lambda m: name_of(m.group(1)), text)  # noqa: E731
        value = self.value
        if isinstance(value, (list, tuple)):
            value = " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        elif isinstance(value, float):
            value = f"{value:g}"
        text = f"{name_of(self.field)} {value} is invalid: {sub(self.allowed)}"
        return f"{text}; {sub(self.fix)}" if self.fix else text


def flag_name(field: str) -> str:
    """The command-line flag of a field: ``batch_size`` -> ``--batch-size``."""
    return "--" + field.replace("_", "-")


def is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def require(ok: bool, field: str, value: Any, allowed: str, fix: str = "") -> None:
    """Raise SettingError unless ``ok``."""
    if not ok:
        raise SettingError(field, value, allowed, fix)


def choices(annotation: Any) -> tuple | None:
    """The values of a ``Literal[...]`` annotation (also inside ``X | None``), else None."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if (found := choices(arg)) is not None:
                return found
    return None


@functools.cache
def _literal_fields(cls: type) -> dict[str, tuple]:
    hints = typing.get_type_hints(cls)
    return {f.name: values for f in dataclasses.fields(cls)
            if (values := choices(hints[f.name])) is not None}


def check_choices(obj: Any) -> None:
    """Every ``Literal``-typed field of the dataclass ``obj`` holds one of its values (the
    one check of every closed choice; the flags take their choices from the same types)."""
    for name, values in _literal_fields(type(obj)).items():
        value = getattr(obj, name)
        if value is None and type(None) in typing.get_args(typing.get_type_hints(
                type(obj))[name]):
            continue
        require(value in values, name, value, f"must be one of {', '.join(map(str, values))}",
                f"pass one of them to {{{name}}}")


def positive_int(obj: Any, *names: str) -> None:
    """Each named field of ``obj`` is an integer >= 1."""
    for name in names:
        value = getattr(obj, name)
        require(is_int(value) and value >= 1, name, value, "must be an integer >= 1",
                f"pass a positive {{{name}}}")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it in the class body (its first paragraph)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                text = inspect.cleandoc(nxt.value.value).split("\n\n")[0]
                docs[node.target.id] = " ".join(text.split())
    return docs


def replace_fields(obj: Any, values: dict[str, Any]) -> Any:
    """``dataclasses.replace`` with only the fields ``obj`` has and values that are not None."""
    names = {f.name for f in dataclasses.fields(obj)}
    given = {k: v for k, v in values.items() if k in names and v is not None}
    return dataclasses.replace(obj, **given) if given else obj
