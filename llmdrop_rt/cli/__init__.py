"""Command line: `python -m llmdrop_rt <command> --help`. One module per command group."""
from __future__ import annotations

import argparse
import sys

from . import drop, evaluate, export, generate, heal, quantize


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llmdrop_rt",
                                     description="llmdrop-rt: run Llama/Mistral models with dropped modules.")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in (generate, evaluate, drop, export, quantize, heal):
        group.add_commands(commands)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError, ImportError) as e:  # our errors name the problem
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

