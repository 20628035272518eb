"""`ms-xcomposer export-hf MS_DIR HF_DIR`: converted MindSpore directory -> HF safetensors directory."""
from __future__ import annotations

import argparse

from ms_xcomposer.cli import EXIT_OK
from ms_xcomposer.commands.convert import print_warning, progress_bar, sigterm_as_interrupt

EXAMPLES = """examples:
  ms-xcomposer export-hf ./ixc25-ms ./ixc25-hf
  ms-xcomposer export-hf ./ixc25-ms ./ixc25-hf --shard-size 2GB --overwrite

Writes model-0000i-of-0000N.safetensors shards with the HF tensor names, model.safetensors.index.json,
config.json (HF fields), the tokenizer files and conversion_report.json. Tensors keep their exact bits, so
HF -> convert -> export-hf gives back identical tensors. --overwrite replaces only an empty directory or one
this tool wrote (it holds conversion_report.json).
"""


def run(args: argparse.Namespace) -> int:
    from ms_xcomposer.conversion.convert import export_hf

    with sigterm_as_interrupt(), progress_bar(args.quiet, "export-hf") as progress:
        result = export_hf(args.src, args.dst, shard_size=args.shard_size, overwrite=args.overwrite,
                           progress=progress, warn=print_warning)
    print(f"exported {result.summary()}")
    return EXIT_OK


def register(subparsers) -> None:
    from ms_xcomposer.conversion.convert import DEFAULT_SHARD_SIZE

    parser = subparsers.add_parser(
        "export-hf", help="write a converted MindSpore directory back as an HF safetensors directory",
        description="Export a converted MindSpore checkpoint directory to a Hugging Face directory "
                    "(safetensors shards with HF names and an index).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="MS_DIR", help="directory written by `ms-xcomposer convert`")
    parser.add_argument("dst", metavar="HF_DIR", help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE, help="maximum shard size (default 5GB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace HF_DIR if it is empty or was written by this tool")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=run)
