"""The study's baseline: a lambda grid for each of L1, sqrt and sqrt(sqrt).

Every SAE also gets its global-threshold removal curve (the study's 15-SAE
figure), saved beside its checkpoint and gathered into ablations.parquet.
Same Tune machinery as exponent_search.py, with a grid instead of Optuna.
"""

import sys

from raysae.search.job import main

if __name__ == "__main__":
    sys.exit(main(sweep=True, description=__doc__))
