"""`python -m kdlab`: the workflow's rules run the package with Snakemake's own interpreter."""

import sys

from .cli import main

sys.exit(main())
