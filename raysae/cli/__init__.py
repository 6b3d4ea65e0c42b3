"""`raysae` command line: one entry point, one subcommand per stage.

    raysae search | sweep | report | export | ablation | cache | build-model   (or python -m raysae)

Every bad input, from argparse or from the configs and pre-flight checks (a
``raysae.settings.UserError``), ends the same way: one line ``raysae <command>: error: <what
and the fix>`` on stderr, exit status 2. A search that ran but trained nothing exits 1 with
its cause in one line; any other exception is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys

from raysae.cli.ablation import add_ablation_parser
from raysae.cli.cache import add_build_model_parser, add_cache_parser
from raysae.cli.export import add_export_parser
from raysae.cli.report import add_report_parser
from raysae.cli.search import add_parsers
from raysae.settings import JobFailed, SettingError, UserError, flag_name


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit status 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description kept as written."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = Parser(prog="raysae", description=__doc__.splitlines()[0],
                    formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser)
    add_parsers(sub)
    add_report_parser(sub)
    add_export_parser(sub)
    add_ablation_parser(sub)
    add_build_model_parser(sub)
    add_cache_parser(sub)
    return parser


def error_text(err: Exception) -> str:
    """One line: a SettingError speaks in flags, anything else as it is."""
    text = err.render(flag_name) if isinstance(err, SettingError) else str(err)
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns its exit status (2 on bad input)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a flag argparse refused (2, message printed)
        return int(exc.code or 0)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"raysae {args.command}: error: {error_text(err)}", file=sys.stderr)
        return 2
    except JobFailed as err:
        print(f"raysae {args.command}: error: {error_text(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # Ctrl-C / SIGTERM (raysae.search.interrupt)
        signum = getattr(err, "signum", 2)
        resume = "" if args.command not in ("search", "sweep") else (
            "; Tune saved the experiments and every trial's last checkpoint: resume with "
            + shlex.join(["raysae", *_argv(argv), *([] if "--resume" in _argv(argv)
                                                    else ["--resume"])]))
        print(f"raysae {args.command}: interrupted ({_signal_name(signum)}); no tables or "
              f"report written{resume}", file=sys.stderr, flush=True)
        return 128 + signum


def _argv(argv: list[str] | None) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


if __name__ == "__main__":
    sys.exit(main())
