"""The study's threshold ablation on one trained SAE: four removal methods, table + two figures.

    python searches/threshold_ablation.py SAE_DIR [--model M] [--hook H] [--out DIR]

Same as ``raysae ablation SAE_DIR``; see raysae/cli_ablation.py for the options and files.
"""

import argparse
import sys

from raysae.cli.ablation import ablation_command, add_ablation_arguments

if __name__ == "__main__":
    parser = add_ablation_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    try:
        sys.exit(ablation_command(parser.parse_args()))
    except ValueError as err:
        print(f"threshold_ablation: error: {err}", file=sys.stderr)
        sys.exit(2)
