"""`ms-xcomposer` command line: thin subcommands that parse, call the library and print.

Each subcommand lives in `ms_xcomposer/commands/<name>.py` and exposes `register(subparsers)`, which adds its
parser and sets `func(args) -> int`. Errors the library raises on bad input become one line on stderr
(a traceback only with --debug).

Exit codes: 0 success; 1 a check failed (verify/parity mismatch); 2 bad input or usage; 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

COMMANDS = ("convert", "export_hf", "verify", "info", "chat", "parity", "demo")
EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ms-xcomposer",
        description="InternLM-XComposer2 (IXC2-VL, IXC2-4KHD, IXC-2.5) on MindSpore.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit codes: 0 ok, 1 a check failed, 2 bad input or usage, 130 interrupted.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"ms_xcomposer.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"ms_xcomposer.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError, KeyError) as e:  # the library's input errors derive from these
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
