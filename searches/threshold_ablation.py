"""The study's threshold ablation on one trained SAE: four removal methods, table + two figures.

    python searches/threshold_ablation.py SAE_DIR [--model M] [--hook H] [--out DIR]

Same as ``raysae ablation SAE_DIR``; see raysae/cli/ablation.py for the options and files.
"""

import sys

from raysae.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablation", *sys.argv[1:]]))
