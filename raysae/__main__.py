"""`python -m raysae ...` is the `raysae` command."""

import sys

from raysae.cli import main

sys.exit(main())
