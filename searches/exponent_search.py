"""Which sparsity penalty gives the best CE at each L0?

Optuna (TPE, via Ray Tune) searches the penalty's parameters (default: the shifted power
(f + eps)^p - eps^p; --penalty power tanh log lets it choose the family too) for each
target L0, with lambda driven to the target by a controller; the study's L1, sqrt and
sqrt(sqrt) are trained in every search. Ends with trials.parquet and report.html.

No arguments: the embedded default (local Ray, a locally built model, the Python
standard library's sources as text; offline, minutes on 2 cores).
`--preset pythia-70m`: the study's setting (needs the model hub and the Pile).
Same as `raysae search`; `--help` lists every flag.
"""

import sys

from raysae.cli import main

if __name__ == "__main__":
    sys.exit(main(["search", *sys.argv[1:]]))
