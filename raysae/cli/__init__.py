"""`raysae` command line: one entry point, one subcommand per stage.

Each stage module offers ``add_<name>_parser(subparsers)`` which sets ``func``; bad input
(ValueError) becomes a one-line message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    from raysae.analysis.report import add_report_parser
    from raysae.cli.ablation import add_ablation_parser
    from raysae.cli.cache import add_build_model_parser, add_cache_parser

    parser = argparse.ArgumentParser(prog="raysae", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_report_parser(sub)
    add_ablation_parser(sub)
    add_build_model_parser(sub)
    add_cache_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns its exit status (2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as err:
        print(f"raysae {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
