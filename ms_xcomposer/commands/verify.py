"""`ms-xcomposer verify HF_DIR MS_DIR`: compare every tensor of two checkpoints; exit 0 only if all match."""
from __future__ import annotations

import argparse

from ms_xcomposer.cli import EXIT_CHECK_FAILED, EXIT_OK
from ms_xcomposer.commands.convert import progress_bar

EXAMPLES = """examples:
  ms-xcomposer verify ./internlm-xcomposer2d5-7b ./ixc25-ms
  ms-xcomposer verify ./ixc25-ms ./ixc25-hf-exported

Tensors are matched by MindSpore parameter name. Same dtype: bit-identical; a cast conversion
(convert --dtype) must equal the same cast of the source. RoPE buffers and task adapters dropped by
`convert --task-lora drop` are skipped. Exit 0 if everything matches, 1 otherwise; 2 if a file cannot be read,
e.g. a converted directory's config.json is unreadable or does not describe its tensors.
"""
_SHOW = 20  # problems printed per category


def run(args: argparse.Namespace) -> int:
    from ms_xcomposer.conversion.convert import verify

    with progress_bar(args.quiet, "verify") as progress:
        result = verify(args.first, args.second, progress=progress)
    for title, items in (("differ", result.mismatched), ("missing from the second", result.missing),
                         ("only in the second", result.extra)):
        for line in items[:_SHOW]:
            print(f"{title}: {line}")
        if len(items) > _SHOW:
            print(f"{title}: ... and {len(items) - _SHOW} more")
    if args.verbose:
        for line in result.skipped:
            print(f"skipped: {line}")
    print(result.summary())
    return EXIT_OK if result.ok else EXIT_CHECK_FAILED


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "verify", help="compare every tensor of an HF checkpoint and a converted one",
        description="Compare two checkpoints (HF or converted directories) tensor by tensor.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("first", metavar="HF_DIR", help="the source checkpoint (HF or converted directory)")
    parser.add_argument("second", metavar="MS_DIR", help="the checkpoint to check against it")
    parser.add_argument("--verbose", action="store_true", help="also list skipped tensors")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=run)
