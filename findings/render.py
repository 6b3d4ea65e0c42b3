"""Every result number in the docs, rendered from the committed files in findings/.

    python findings/render.py           # rewrite the generated blocks of README.md, docs/*.md
    python findings/render.py --check   # exit 1 when a block differs from what the files
                                        # render, or a result-like number stands outside one

A generated block is the text between ``<!-- BEGIN findings:NAME -->`` and
``<!-- END findings:NAME -->``; NAME is a renderer registered here with ``@block("NAME")``
(findings/blocks.py), which reads only files under findings/. Text outside the blocks is
written by hand and must not state a measured result: an interval, a "1.2x", a tokens/s or
ms/step figure, a percentage of a measurement (``RESULT_LIKE``). When a default changes, the
run under findings/ is redone and this command renders the new numbers everywhere.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blocks import RENDERERS  # noqa: E402  (findings/ is on the path, as for a script)

ROOT = Path(__file__).resolve().parents[1]
FINDINGS = ROOT / "findings"
BLOCK = re.compile(r"(<!-- BEGIN findings:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)"
                   r"(<!-- END findings:(?P=name) -->)", re.S)
RESULT_LIKE = re.compile(
    r"[-+]?\d*\.\d+ \[[-+]?\d*\.\d+, [-+]?\d*\.\d+\]"  # an interval: -0.03 [-0.05, -0.01]
    r"|\b\d+(?:\.\d+)?x (?:faster|slower|the|of|as|alone)\b"  # a ratio: 1.7x faster
    r"|\b\d[\d,]*(?:\.\d+)? (?:tokens|rows)/s\b"  # a rate
    r"|\b\d+(?:\.\d+)? ms/step\b"
    r"|\b(?:rho|Spearman's rho) (?:of )?[-+]?\d*\.\d+")
"""What a measured result looks like in prose (checked outside generated blocks)."""


def documents() -> list[Path]:
    """The Markdown files whose blocks are rendered and whose prose is checked."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def render(text: str, where: str = "") -> str:
    """``text`` with every generated block's body rendered anew."""
    def body(match: re.Match) -> str:
        name = match["name"]
        if name not in RENDERERS:
            raise SystemExit(f"{where}: block {name!r} has no renderer in findings/blocks.py; "
                             f"known: {sorted(RENDERERS)}")
        out = RENDERERS[name]().rstrip("\n") + "\n"
        return match.group(1) + out + match.group(4)
    return BLOCK.sub(body, text)


def outside_blocks(text: str) -> str:
    """``text`` with the generated blocks' bodies removed (what is written by hand)."""
    return BLOCK.sub(lambda m: m.group(1) + m.group(4), text)


def stray_results(text: str) -> list[str]:
    """Lines of hand-written text (outside blocks and code fences) that state a result."""
    out, fenced = [], False
    for line in outside_blocks(text).splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced and RESULT_LIKE.search(line):
            out.append(line.strip())
    return out


def problems() -> list[str]:
    """Every differing block and every stray result in the documents."""
    found = []
    for path in documents():
        text = path.read_text()
        rel = path.relative_to(ROOT)
        if render(text, str(rel)) != text:
            found.append(f"{rel}: generated blocks differ from findings/ "
                         "(run python findings/render.py)")
        found += [f"{rel}: a result outside a generated block: {line}"
                  for line in stray_results(text)]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 on a stale block or a stray result")
    args = parser.parse_args(argv)
    if args.check:
        found = problems()
        print("\n".join(found) or "findings: every block is current, no stray result")
        return 1 if found else 0
    for path in documents():
        text = path.read_text()
        new = render(text, str(path.relative_to(ROOT)))
        if new != text:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(new)
            os.replace(tmp, path)
            print(f"rendered {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
