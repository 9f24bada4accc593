"""``python -m kdlab.results ...``: the same as ``kdlab results ...``, without the console script."""

import argparse
import sys

from .command import add_parser

parser = argparse.ArgumentParser(prog="kdlab")
add_parser(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(["results", *sys.argv[1:]])
sys.exit(args.func(args))
