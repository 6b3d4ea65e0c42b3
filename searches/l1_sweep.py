"""The study's baseline: a lambda grid for each of L1, sqrt and sqrt(sqrt).

Every SAE also gets its global-threshold removal curve (the study's 15-SAE
figure), saved beside its checkpoint and gathered into ablations.parquet.
Same Tune machinery as exponent_search.py, with a grid instead of Optuna.
Same as `raysae sweep`; `--help` lists every flag.
"""

import sys

from raysae.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
