"""SAE kinds known in one place (issue #26): a kind registered outside raysae (tests/toy_kind.py,
a plugin) reaches the CLI, the search, the comparisons, the claims, the figures and the
report with no other edit, and no raysae module writes a registered kind's name or label
out (only the kinds' own modules)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from search_helpers import use_plugin

import raysae
from raysae import cli
from raysae.analysis import claims, plots, report
from raysae.core import kind_registry
from raysae.core.kinds import DEFAULT_KIND, KINDS, baseline_kinds, default_baselines, register_kind
from raysae.core.metrics import metric_names
from raysae.core.sae import ARCHITECTURES
from raysae.results import contract
from raysae.search.config import SearchConfig, job_config
from raysae.search.stages import compare_trials

ROOT = Path(raysae.__file__).resolve().parent
HOOK = "blocks.0.hook_resid_post"
TOY = "tests.toy_kind"


@pytest.fixture
def toy(monkeypatch):
    """The toy kind, for this test only (search_helpers.use_plugin)."""
    cls = use_plugin(monkeypatch, TOY).ToyKind
    KINDS.remove(cls.name)  # its first import registered it; this test owns it now
    register_kind(cls)
    yield cls
    KINDS.remove(cls.name)


def test_the_cli_and_the_config_offer_a_new_baseline_kind(toy, capsys):
    assert baseline_kinds()[-1] == toy.name and SearchConfig().baselines == default_baselines()
    assert cli.main(["search", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert re.search(r"--baselines \{[^}]*\btoykind\b[^}]*\}", text)
    assert f"(default: {' '.join(default_baselines())})" in text
    assert job_config(baselines=(toy.name,)).search.baselines == (toy.name,)
    assert cli.main(["search", "--kind", toy.name]) == 2  # no penalty to propose


def test_baselines_none_trains_no_baseline_and_mixing_it_is_refused():
    """``--baselines none`` (the config's NO_BASELINES alone) gives a search of the
    references and proposals only; ``none`` beside a kind is a clear error."""
    from raysae.cli.flags import given
    from raysae.search.config import NO_BASELINES
    from raysae.search.space import reference_configs

    values = given(cli.build_parser().parse_args(["search", "--baselines", NO_BASELINES]))
    values.pop("preset", None)
    search = job_config(**values).search
    assert search.baselines == ()
    assert [c.get("kind") for c in reference_configs(search.baselines)] == [None] * 3
    with pytest.raises(ValueError, match="pass some, or none"):
        SearchConfig(baselines=("topk", NO_BASELINES))


def _trials(labels) -> pd.DataFrame:
    """A 3-seed ladder (targets 8, 16) of each (label, family, kind, CE offset)."""
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(3):
        for target in (8.0, 16.0):
            for label, family, kind, delta in labels:
                blocks = (4.5 - 0.1 * np.log2(target) + delta + rng.normal(0, 0.02, 16))
                rows.append({"trial_id": f"{label}-{seed}-{target}", "status": "finished",
                             "family": family, "label": label, "kind": kind,
                             "penalty": "power", "seed": seed, "target_l0": target,
                             "l0": target * 1.01, "ce_sae": float(blocks.mean()),
                             "ce_sae_blocks": blocks.tolist(), "experiment": "x_refs",
                             "objective": float(blocks.mean())})
    trials = pd.DataFrame(rows)
    for col in contract.trial_columns(metric_names()):
        trials[col] = trials.get(col, np.nan)
    return trials


def test_comparisons_claims_figures_and_report_take_a_new_baseline(toy, tmp_path):
    trials = _trials([("L1", "L1", DEFAULT_KIND, 0.0), ("sqrt", "sqrt", DEFAULT_KIND, -0.01),
                      ("power(p=0.4, eps=0.1)", "power", DEFAULT_KIND, -0.03),
                      (toy.label, toy.label, toy.name, 0.02)])
    comparisons = compare_trials(trials)
    assert toy.label in set(comparisons["reference"])  # a reference, not a proposal
    assert toy.label in claims.fixed_labels()
    assert f"vs_{toy.label}" in claims.target_winners(comparisons).columns
    assert f"against <b>{toy.label}</b>" in " ".join(claims.headline(comparisons))
    assert plots.style(toy.label) == toy.style
    contract.write_trials(trials, tmp_path, metric_names())
    contract.write_comparisons(comparisons, tmp_path)
    text = report.write_report(tmp_path).read_text()
    assert f"vs_{toy.label}" in text and f"against <b>{toy.label}</b>" in text


@pytest.mark.slow
def test_a_ray_search_trains_the_plugin_kind_as_a_baseline(toy, tiny_model_dir, ray_local,
                                                           tmp_path):
    """Real Tune trials in Ray workers: they know the kind only through the plugin list."""
    from search_helpers import make_plan, make_spec

    from raysae.activations.cache import build_cache
    from raysae.activations.source import ActivationSource
    from raysae.search.stages import run_search

    source = ActivationSource(model=str(tiny_model_dir), hook=HOOK, context_length=32,
                              n_tokens=4096, num_actors=1)
    cache = build_cache(source, tmp_path / "acts", progress=False)
    spec = make_spec(activations=str(cache), model=str(tiny_model_dir), hook=HOOK, d_in=32,
                     d_sae=128, context_length=32, total_tokens=512 * 8, batch_size=512,
                     log_every=4, checkpoint_seconds=0, eval_blocks=4, feature_tokens=1000,
                     lambda_mode="control", targets=(4.0, 8.0))
    assert spec.plugins == (TOY,)
    plan = make_plan("toy", str(tmp_path / "tune"), spec, targets=(4.0, 8.0), num_trials=1,
                     seeds=0, baselines=(toy.name,))
    out = run_search(plan, tmp_path / "results")
    trials = contract.read_trials(out)
    mine = trials[trials["label"] == toy.label]
    assert sorted(mine["target_l0"]) == [4.0, 8.0] and set(mine["status"]) == {"finished"}
    assert set(mine["kind"]) == {toy.name} and set(mine["family"]) == {toy.label}
    assert toy.label in set(contract.read_comparisons(out)["reference"])
    assert toy.label in report.write_report(out).read_text()


def _string_constants(tree: ast.AST):
    """(line, text) of every string constant that is not a docstring (module, class,
    function or attribute docstrings: string statements)."""
    docs = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def test_no_module_writes_a_registered_kind_out():
    """Kind names and labels live in the kinds' own modules; elsewhere they come from the
    registry. Allowed: the default kind's name (relu, also the activation's everyday name)
    and, in raysae.core.sae and .architectures, the SAELens architecture names (a file
    format's own words)."""
    own = {Path(sys.modules[type(kind).__module__].__file__).resolve()
           for kind in KINDS.values()} | {Path(kind_registry.__file__).resolve()}
    words = {w for kind in KINDS.values() for w in (kind.name, kind.label)} - {DEFAULT_KIND}
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.resolve() in own:
            continue
        allowed = set(ARCHITECTURES) if path.name in ("sae.py", "architectures.py") else set()
        pattern = re.compile("|".join(rf"(?<![A-Za-z0-9]){re.escape(w)}(?![A-Za-z0-9])"
                                      for w in sorted(words - allowed)))
        for line, text in _string_constants(ast.parse(path.read_text())):
            if pattern.search(text):
                found.append(f"{path.relative_to(ROOT.parent)}:{line}: {text!r}")
    assert not found, "kind names/labels written out (derive them from the registry):\n" + (
        "\n".join(found))
