"""Which sparsity penalty sum_i (s*f_i)^p gives the best CE at each L0?

Optuna (TPE, via Ray Tune) searches the exponent p and scale s (and lambda with
--lambda-mode search) for each target L0, starting from the study's L1, sqrt and
sqrt(sqrt); every trial trains an SAE on cached LM activations and reports its
spliced CE on held-out text. Ends with trials.parquet and report.html.

No arguments: the embedded default (local Ray, a locally built model, the Python
standard library's sources as text; offline, minutes on 2 cores).
`--preset pythia-70m`: the study's setting (needs the model hub and the Pile).
"""

import sys

from raysae.search.job import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
