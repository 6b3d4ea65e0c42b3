"""The package's shape: no import cycle inside raysae, the import rules between its parts
(issue #36), imports at the top of a module unless a comment says why, modules of one job
(a loose cap on code lines, not a line count that shapes files), one CLI that lists every
subcommand, and a public API."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import raysae
from raysae import cli

ROOT = Path(raysae.__file__).parent
MAX_CODE_LINES = 450
"""Code lines (not blank, comment or docstring) of one module: far above today's largest
(about 280); a module past it has grown a second job."""

PARTS = (("raysae.search.trial", "trial"),
         *((f"raysae.search.{m}", "settings") for m in ("config", "run_settings", "ranges",
                                                          "space")),
         ("raysae.search", "driver"), ("raysae.results", "results"), ("raysae.core", "core"),
         ("raysae.activations", "activations"), ("raysae.lm", "lm"),
         ("raysae.evaluation", "evaluation"), ("raysae.analysis", "analysis"),
         ("raysae.cluster", "cluster"), ("raysae.cli", "cli"), ("raysae.settings", "base"),
         ("raysae.io", "base"), ("raysae.registry", "base"), ("raysae.__main__", "api"),
         ("raysae", "api"))
"""Module prefix -> the part of the house it belongs to (first match)."""
MAY_IMPORT = {
    "base": set(),
    "results": {"base"},
    "core": {"base", "results"},
    "lm": {"base"},
    "cluster": {"base"},
    "activations": {"base", "lm", "cluster"},
    "evaluation": {"base", "core", "lm"},
    "analysis": {"base", "results", "core"},
    "settings": {"base", "core", "activations"},
    "trial": {"base", "results", "core", "lm", "activations", "evaluation", "settings",
              "cluster"},
    "driver": {"base", "results", "core", "lm", "activations", "evaluation", "settings",
               "cluster", "trial", "analysis"},
    "cli": {"base", "results", "core", "lm", "activations", "evaluation", "settings",
            "cluster", "trial", "analysis", "driver", "api"},
    "api": {"base", "core", "settings", "driver", "cli"},
}
"""What each part may import besides itself: the trial side never the driver's modules nor
analysis; analysis reads results and the core's registries, never search; the results
contract and vocabulary only the base; the driver everything but the CLI."""


def _module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
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


def _imports(path: Path, modules: set[str]) -> set[str]:
    """raysae modules a file imports at run time (top-level and inside functions);
    ``from raysae.x import y`` is ``raysae.x.y`` when that is a module."""
    out: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("raysae"):
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules
                out.update(subs or {node.module})
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("raysae"))
    return out


def _graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    return {name: {m for m in _imports(path, set(files)) if m in files and m != name
                   and not name.startswith(m + ".")}  # a package's own __init__ is no edge
            for name, path in files.items()}


def _part(module: str) -> str:
    return next(part for prefix, part in PARTS
                if module == prefix or module.startswith(prefix + "."))


def forbidden_imports(root: Path = ROOT) -> list[str]:
    """Every import that crosses the parts' rules (``MAY_IMPORT``), as "a -> b (why)"."""
    out = []
    for module, targets in sorted(_graph(root).items()):
        mine = _part(module)
        for target in sorted(targets):
            theirs = _part(target)
            if theirs != mine and theirs not in MAY_IMPORT[mine]:
                out.append(f"{module} -> {target} ({mine} may not import {theirs})")
    return out


def test_no_import_cycle_between_raysae_modules():
    graph = _graph()
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


def test_every_import_follows_the_rules_between_parts():
    assert not forbidden_imports(), "\n".join(forbidden_imports())


def test_the_import_rules_catch_a_planted_forbidden_import(tmp_path):
    """The rule check is not vacuous: a trial module importing the driver's stages, and
    analysis importing the search, are named."""
    copy = tmp_path / "raysae"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    spec = copy / "search" / "trial" / "spec.py"
    spec.write_text(spec.read_text() + "\nfrom raysae.search.stages import run_search\n")
    report = copy / "analysis" / "claims.py"
    report.write_text(report.read_text() + "\nfrom raysae.search.job import run\n")
    found = forbidden_imports(copy)
    assert found == ["raysae.analysis.claims -> raysae.search.job (analysis may not import "
                     "driver)", "raysae.search.trial.spec -> raysae.search.stages (trial may "
                     "not import driver)"], found


def _code_lines(path: Path) -> int:
    """Lines that are neither blank, comments, nor docstrings."""
    tree = ast.parse(path.read_text())
    docs: set[int] = set()
    for node in ast.walk(tree):
        for stmt in getattr(node, "body", []) if isinstance(node, (
                ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) else []:
            if (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
                    and isinstance(stmt.value.value, str)):
                docs.update(range(stmt.lineno, stmt.end_lineno + 1))
    return sum(1 for i, line in enumerate(path.read_text().splitlines(), 1)
               if line.strip() and not line.strip().startswith("#") and i not in docs)


def test_modules_have_one_job():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if (n := _code_lines(p)) > MAX_CODE_LINES}
    assert not long, f"modules over {MAX_CODE_LINES} code lines: {long}"


def unexplained_local_imports(root: Path = ROOT) -> list[str]:
    """Imports inside functions with no comment saying why they are not at the top: one on
    the import's line, the line above it, or a line of the same block of imports."""
    out = []
    for path in sorted(root.rglob("*.py")):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for block in _import_blocks(fn.body):
                first, last = block[0].lineno, block[-1].end_lineno
                span = lines[first - 2 : last] if first > 1 else lines[:last]
                if not any("#" in line for line in span):
                    out.append(f"{path.relative_to(root.parent)}:{first}")
    return out


def _import_blocks(body: list[ast.stmt]) -> list[list[ast.stmt]]:
    """Runs of consecutive import statements in a function's body (and its nested blocks)."""
    blocks, run = [], []
    for stmt in body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            run.append(stmt)
            continue
        if run:
            blocks.append(run)
            run = []
        for field in ("body", "orelse", "finalbody", "handlers"):
            inner = getattr(stmt, field, None)
            if isinstance(inner, list) and not isinstance(stmt, (ast.FunctionDef,
                                                                  ast.AsyncFunctionDef)):
                blocks += _import_blocks([s for s in inner if isinstance(s, ast.stmt)]
                                         + [s for h in inner if isinstance(h, ast.excepthandler)
                                            for s in h.body])
    if run:
        blocks.append(run)
    return blocks


def test_imports_are_at_the_top_unless_a_comment_says_why():
    assert not unexplained_local_imports(), "\n".join(unexplained_local_imports())


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
    """A new setting is one documented field: the flag and its help follow from it; a kind's
    option is one documented field of its options dataclass (flag --KIND-OPTION)."""
    import dataclasses

    from raysae.cli import build_parser
    from raysae.core.kinds import KINDS
    from raysae.search.config import SECTIONS, TRAIN_INTERNAL
    from raysae.settings import field_docs

    search = build_parser()._subparsers._group_actions[0].choices["search"]
    by_dest = {a.dest: a for a in search._actions}
    for name, cls in SECTIONS.items():
        if name == "sweep":
            continue
        for f in dataclasses.fields(cls):
            if f.name in TRAIN_INTERNAL or f.name in ("ranges", "kind_options"):
                continue
            assert f.name in by_dest, f"{cls.__name__}.{f.name} has no flag"
            assert field_docs(cls)[f.name].split(".")[0] in (by_dest[f.name].help or "")
    for name, kind in KINDS.items():
        for f in dataclasses.fields(kind.Options):
            dest = f"{name}_{f.name}"
            assert dest in by_dest, f"option {f.name} of kind {name} has no flag"
            assert field_docs(kind.Options)[f.name].split(".")[0] in (by_dest[dest].help or "")
