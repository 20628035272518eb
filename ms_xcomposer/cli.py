"""`ms-xcomposer` command line: thin subcommands that parse, call the library and print.

Each subcommand lives in `ms_xcomposer/commands/<name>.py` and exposes `register(subparsers)`, which adds its
parser and sets `func(args) -> int`. Errors the library raises on bad input become one line on stderr
(a traceback only with --debug).

Exit codes: 0 success; 1 a check failed (verify/parity mismatch, demo check); 2 bad input or usage; 3 an
unexpected internal error (a bug, or a MindSpore runtime failure); 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

# MindSpore reads its C++ log level when it is first imported; without this its INFO/WARNING lines flood the
# terminal. Set here, before any command module can import mindspore, unless the user chose a level.
os.environ.setdefault("GLOG_v", "3")

COMMANDS = ("convert", "export_hf", "verify", "info", "chat", "serve", "parity", "demo")
EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = """exit codes:
  0    success
  1    a check failed (verify: tensors differ; parity: a stage is out of tolerance; demo: a check failed)
  2    bad input or usage (missing file, malformed checkpoint, bad option); the message names the problem
  3    unexpected internal error (run again with --debug for the traceback, and report it)
  130  interrupted (Ctrl-C or SIGTERM)
"""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors (`error: MESSAGE; see `PROG --help``) instead of the usage block.

    Subcommand parsers are made with the same class (argparse's default `parser_class`)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    from ms_xcomposer import __version__

    parser = ArgumentParser(
        prog="ms-xcomposer",
        description="InternLM-XComposer2 (IXC2-VL, IXC2-4KHD, IXC-2.5) on MindSpore.\n"
                    "Run `ms-xcomposer COMMAND --help` for a command's options and examples.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  ms-xcomposer demo\n"
               "  ms-xcomposer convert ./internlm-xcomposer2d5-7b ./ixc25-ms\n"
               "  ms-xcomposer info ./ixc25-ms\n"
               "  ms-xcomposer chat ./ixc25-ms --image photo.jpg --query 'Describe this image.'\n"
               "  ms-xcomposer serve ./ixc25-ms --port 8000\n\n" + EXIT_CODES,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
    except BrokenPipeError:  # the reader of stdout went away (`ms-xcomposer info DIR | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return EXIT_OK
    except (ValueError, OSError, KeyError) as e:  # the library's input errors derive from these
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # noqa: BLE001 - anything else is a bug or a runtime failure: one line, not a traceback
        if args.debug:
            raise
        print(f"error: internal error: {type(e).__name__}: {first_line(e)} (run with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL_ERROR


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (MindSpore's errors append pages of C++ context)."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), repr(error))
