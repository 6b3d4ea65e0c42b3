"""`raysae report RESULTS_DIR`: rebuild report.html from a search's results folder."""

from __future__ import annotations


def add_report_parser(subparsers) -> None:
    """Register `report RESULTS_DIR` on an argparse subparsers object."""
    p = subparsers.add_parser("report", help="write RESULTS_DIR/report.html from a search")
    p.add_argument("results_dir", help="folder holding trials.parquet (and optional tables)")
    p.add_argument("--out", default=None, help="where to write the page (default: inside it)")
    p.set_defaults(func=report_command)


def report_command(args) -> int:
    """Write the report and print its path."""
    # on use: the report's stack (matplotlib, scipy, moocore) loads when it runs
    from raysae.analysis.report import write_report

    print(write_report(args.results_dir, args.out))
    return 0
