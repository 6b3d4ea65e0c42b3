"""Command-line flags generated from config dataclasses: one flag per documented field.

``add_section(parser, cls, title)`` adds a heading with one flag per field of ``cls`` (help:
the field's docstring, default: the field's); every flag defaults to None ("not given"), so
``given(args)`` returns only what the user typed and presets stay underneath. A field named
``x`` becomes ``--x`` (``_`` -> ``-``); a bool that defaults to True becomes ``--no-x``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from raysae import settings
from raysae.settings import field_docs, flag_name

_SCALARS = (int, float, str)


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(element type, is a sequence) of a field annotation such as ``tuple[float, ...] | None``
    (a ``Literal`` of strings is a str)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return type(args[0]), False
    if origin in (typing.Union, types.UnionType):
        return _base_type(args[0])
    if origin in (tuple, list):
        return args[0], True
    return annotation, False


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def add_section(parser: argparse.ArgumentParser, cls: type, title: str, *,
                skip: tuple[str, ...] = (), choices: dict[str, tuple] | None = None,
                prefix: str = "") -> None:
    """One argument group ``title`` with a flag per field of ``cls`` (except ``skip``); a
    ``Literal``-typed field's flag takes its values as choices, ``choices`` adds others
    (registries); ``prefix`` names the flags ``--PREFIX-FIELD`` (a kind's options)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    group = parser.add_argument_group(title)
    for field in dataclasses.fields(cls):
        if field.name in skip or dataclasses.is_dataclass(hints[field.name]):
            continue
        dest = f"{prefix}_{field.name}" if prefix else field.name
        kind, many = _base_type(hints[field.name])
        if kind not in (*_SCALARS, bool):
            continue
        default = _default(field)
        help_text = docs.get(field.name, "").replace("%", "%%")
        if kind is bool:
            if default is True:
                group.add_argument("--no-" + dest.replace("_", "-"), dest=dest,
                                   action="store_false", default=None, help=help_text)
            else:
                group.add_argument(flag_name(dest), dest=dest, action="store_true",
                                   default=None, help=help_text)
            continue
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        extra: dict[str, Any] = {"nargs": "+"} if many else {}
        if many and isinstance(default, tuple) and len(default) == 2 and "range" in field.name:
            extra = {"nargs": 2, "metavar": ("LOW", "HIGH")}
        if "const" in field.metadata:  # the flag alone means this value (--wandb)
            extra.update(nargs="?", const=field.metadata["const"])
        closed = settings.choices(hints[field.name])
        if closed is not None:
            extra["choices"] = closed
        if choices and field.name in choices:
            extra["choices"] = choices[field.name]
        group.add_argument(flag_name(dest), dest=dest, type=kind, default=None,
                           help=f"{help_text} (default: {shown})", **extra)


def add_range_flags(parser: argparse.ArgumentParser, params: dict[str, str]) -> None:
    """``--FAMILY-PARAM-range LOW HIGH`` per searchable penalty parameter ("family_param"
    -> help)."""
    group = parser.add_argument_group("searched penalty ranges (from the penalty registry)")
    for name, help_text in params.items():
        group.add_argument(flag_name(f"{name}_range"), dest=f"{name}_range", type=float,
                           nargs=2, metavar=("LOW", "HIGH"), default=None,
                           help=help_text.replace("%", "%%"))


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The flags the user gave (value not None), lists as tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()
            if v is not None and k not in ("func", "command")}
