"""Command line: `python -m llmdrop_rt <command> --help`. One module per command group.

Every error ends the command with one line on stderr, `error: ...`, naming the file, field or argument: exit
status 2 for a request we refuse (bad arguments, files or configs; filesystem errors), 1 for an unexpected failure
(`error: internal error: <type>: <message>`). `--debug` or LLMDROP_RT_DEBUG=1 shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import drop, evaluate, export, generate, heal, quantize, serve
from .args import check_paths

DEBUG_ENV_VAR = "LLMDROP_RT_DEBUG"
# Failures that describe a request we refuse: their messages name the file, field or argument.
REFUSALS = (ValueError, OSError, ImportError, KeyError)


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line, like every other error of ours (the usage is in --help)."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m llmdrop_rt",
        description="llmdrop-rt: run Llama, Mistral, Qwen and Gemma2 models with dropped modules.",
        epilog="Errors are one line on stderr naming the file, field or argument (exit 2; 1 for an internal "
               f"error); --debug or {DEBUG_ENV_VAR}=1 shows the traceback instead.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (before the command)")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in (generate, evaluate, drop, export, quantize, heal, serve):
        group.add_commands(commands)
    return parser


def describe(error: BaseException) -> str:
    """One line for an error: an OSError as `path: reason`, a KeyError without its quotes, others as they say."""
    if isinstance(error, OSError) and error.filename is not None:
        target = f" -> {error.filename2}" if error.filename2 is not None else ""
        text = f"{error.filename}{target}: {error.strerror or error}"
    elif isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    else:
        text = str(error) or type(error).__name__
    if not isinstance(error, REFUSALS):
        text = f"internal error: {type(error).__name__}: {text} (run with --debug for the traceback)"
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv=None):
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV_VAR, "") not in ("", "0")
    try:
        check_paths(args)
        args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if debug:
            raise
        print(f"error: {describe(e)}", file=sys.stderr)
        sys.exit(2 if isinstance(e, REFUSALS) else 1)
