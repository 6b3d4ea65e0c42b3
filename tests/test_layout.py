"""The package's shape: no import cycle inside raysae, modules of a readable size, one CLI
that lists every subcommand, and a public API."""

from __future__ import annotations

import ast
from pathlib import Path

import raysae
from raysae import cli

ROOT = Path(raysae.__file__).parent
MAX_LINES = 330


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _runtime_nodes(tree: ast.AST):
    """Every node, except those under ``if TYPE_CHECKING:`` (no import at run time)."""
    for node in ast.iter_child_nodes(tree):
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Name)
                and node.test.id == "TYPE_CHECKING"):
            continue
        yield node
        yield from _runtime_nodes(node)


def _imports(path: Path) -> set[str]:
    """raysae modules imported at run time by a file (top-level and inside functions)."""
    out: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("raysae"):
                out.add(node.module)
                out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("raysae"))
    return out


def test_no_import_cycle_between_raysae_modules():
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {name: {m for m in _imports(path) if m in files and m != name
                    and not name.startswith(m + ".")}  # a package's own __init__ is no edge
             for name, path in files.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_modules_stay_readable():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_one_cli_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("search", "sweep", "report", "ablation", "cache", "build-model"):
        assert command in text


def test_every_registered_penalty_is_a_searchable_family():
    """The registry drives the CLI's flags and the search space (one test per penalty)."""
    from raysae.cli.search import searchable_params
    from raysae.core.penalties import PENALTIES
    from raysae.search.config import SearchConfig
    from raysae.search.space import SearchSpace

    flags = searchable_params()
    for name, spec in PENALTIES.items():
        space = SearchSpace(SearchConfig(penalty=(name,))).describe()
        assert [d["name"] for d in space] == [f"{name}.{p.name}" for p in spec.searched_params()]
        assert all(f"{name}_{p.name}" in flags for p in spec.searched_params())


def test_public_api():
    for name in ("TrainConfig", "SAEConfig", "PenaltyConfig", "SAE", "train_ladder",
                 "register_penalty", "job_config", "run_job"):
        assert hasattr(raysae, name), name


def test_every_setting_is_a_flag_with_its_docstring_as_help():
    """A new setting is one documented field: the flag and its help follow from it."""
    import dataclasses

    from raysae.cli import build_parser
    from raysae.search.config import SECTIONS, TRAIN_INTERNAL
    from raysae.settings import field_docs

    search = build_parser()._subparsers._group_actions[0].choices["search"]
    by_dest = {a.dest: a for a in search._actions}
    for name, cls in SECTIONS.items():
        if name == "sweep":
            continue
        for f in dataclasses.fields(cls):
            if f.name in TRAIN_INTERNAL or f.name == "ranges":
                continue
            assert f.name in by_dest, f"{cls.__name__}.{f.name} has no flag"
            assert field_docs(cls)[f.name].split(".")[0] in (by_dest[f.name].help or "")
