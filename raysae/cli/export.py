"""`raysae export RESULTS_DIR --format saebench`: every SAE of a search's results folder as a
SAEBench core-eval JSON, its SAELens folder copied beside it."""

from __future__ import annotations

from raysae.analysis.export_saebench import (
    EXPORT_DIR,
    FORMATS,
    export_results,
    skipped_proposals,
)


def add_export_parser(subparsers) -> None:
    """Register `export RESULTS_DIR` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "export", help="write each SAE of RESULTS_DIR as a SAEBench JSON + SAELens folder")
    p.add_argument("results_dir", help="folder holding trials.parquet (written by a search)")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default=FORMATS[0],
                   help="output layout (default: %(default)s: SAEBench core-eval metric names)")
    p.add_argument("--out", default=None,
                   help=f"folder to write (default: RESULTS_DIR/{EXPORT_DIR}/FORMAT); an "
                        f"earlier export there is replaced")
    p.set_defaults(func=export_command)


def export_command(args) -> int:
    """Export, then print one line: how many SAEs, where."""
    out, names = export_results(args.results_dir, args.out, args.fmt)
    print(f"exported {len(names)} SAE{'s' * (len(names) != 1)} to {out} ({args.fmt}: "
          f"<name>.json + <name>/ in SAELens layout each)")
    stopped = skipped_proposals(args.results_dir)
    if stopped:
        print(f"skipped {stopped} proposal{'s' * (stopped != 1)} stopped at their rung: a "
              "multi-fidelity search keeps no SAE of them (their rung score is in "
              "trials.parquet)")
    return 0
