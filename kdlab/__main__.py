"""`python -m kdlab`: the workflow's rules run the package with Snakemake's own interpreter."""

import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C in a job's first instant, before main() can catch it (see cli.main)
    print("kdlab: interrupted while starting, before it wrote anything", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
