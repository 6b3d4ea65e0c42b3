"""Every result number in the docs is rendered from committed files under findings/: the
docs as committed are what `python findings/render.py` makes of those files, and a result
typed by hand outside a generated block is found."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "findings"))
import render  # noqa: E402  (findings/render.py, a script)


def test_the_docs_are_what_the_committed_findings_render():
    assert render.problems() == []


def test_every_block_in_the_docs_has_a_renderer_and_every_renderer_is_used():
    used = {m["name"] for path in render.documents()
            for m in render.BLOCK.finditer(path.read_text())}
    assert used == set(render.RENDERERS)


@pytest.mark.parametrize("line", [
    "sqrt minus L1 is -0.028 [-0.036, -0.020] at 32.",
    "The sparse step is 3.6x faster than the bare loop.",
    "It trains 39,046 tokens/s on two cores.",
    "A step takes 4.58 ms/step on the H200.",
    "Spearman's rho of 0.72 between rung and final score.",
])
def test_a_hand_typed_result_outside_a_block_is_found(line):
    text = f"# Page\n\nSome prose.\n{line}\n"
    assert render.stray_results(text) == [line]


def test_the_same_result_inside_a_block_or_a_code_fence_is_not_a_stray():
    name = next(iter(render.RENDERERS))
    inside = (f"<!-- BEGIN findings:{name} -->\n-0.028 [-0.036, -0.020]\n"
              f"<!-- END findings:{name} -->\n")
    fenced = "```\n-0.028 [-0.036, -0.020]\n```\n"
    assert render.stray_results(inside) == [] and render.stray_results(fenced) == []


def test_a_hand_edited_block_is_stale_and_rendering_restores_it():
    path = ROOT / "README.md"
    text = path.read_text()
    match = next(render.BLOCK.finditer(text))
    edited = text.replace(match["body"], match["body"] + "-0.100 [-0.200, -0.001]\n", 1)
    assert render.render(edited) != edited
    assert render.render(edited) == text


def test_check_fails_on_a_hand_typed_interval_in_a_doc(tmp_path, monkeypatch, capsys):
    doc = tmp_path / "README.md"
    doc.write_text((ROOT / "README.md").read_text() + "\nTopK wins by -0.05 [-0.07, -0.03].\n")
    monkeypatch.setattr(render, "documents", lambda: [doc])
    monkeypatch.setattr(render, "ROOT", tmp_path)
    assert render.main(["--check"]) == 1
    assert "a result outside a generated block: TopK wins by -0.05" in capsys.readouterr().out
