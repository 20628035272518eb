"""`ms-xcomposer convert SRC_HF_DIR DST_DIR`: HF XComposer2 checkpoint -> MindSpore checkpoint directory.

Also home of the progress bar and SIGTERM handling shared by `export-hf` and `verify`.
"""
from __future__ import annotations

import argparse
import signal
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from ms_xcomposer.cli import EXIT_OK

EXAMPLES = """examples:
  ms-xcomposer convert ./internlm-xcomposer2d5-7b ./ixc25-ms
  ms-xcomposer convert ./internlm-xcomposer2-vl-7b ./vl-ms --dtype float16 --format safetensors
  ms-xcomposer convert ./internlm-xcomposer2d5-7b ./ixc25-ms --task-lora drop --shard-size 2GB --overwrite

The output directory holds config.json (HF fields + an "ms_xcomposer" section), mindspore_model.index.json,
mindspore_model-0000i-of-0000N.ckpt shards, the tokenizer files and conversion_report.json. It is built in a
temporary sibling directory and renamed into place only when complete.
"""


@contextmanager
def progress_bar(quiet: bool, desc: str) -> Iterator[Callable[[int, int], None]]:
    """A tqdm bar over bytes on stderr, silent with --quiet or when stderr is not a terminal."""
    from tqdm import tqdm

    bar: Optional[tqdm] = None
    disable = quiet or not sys.stderr.isatty()

    def update(n: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=disable,
                       file=sys.stderr, dynamic_ncols=True)
        bar.update(n)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so a killed conversion removes its temporary directory."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ms_xcomposer.conversion.convert import DEFAULT_SHARD_SIZE, DTYPE_CHOICES, FORMAT_CHOICES

    parser.add_argument("src", metavar="SRC_HF_DIR", help="Hugging Face directory (safetensors or .bin shards)")
    parser.add_argument("dst", metavar="DST_DIR", help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="keep",
                        help="stored dtype: keep (bit-exact, default) or cast via fp32 rounding once")
    parser.add_argument("--format", dest="fmt", choices=FORMAT_CHOICES, default="ckpt",
                        help="shard format (default ckpt)")
    parser.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE,
                        help="maximum shard size, e.g. 5GB (default), 500MB, 2GiB")
    parser.add_argument("--task-lora", choices=("keep", "drop"), default="keep",
                        help="IXC-2.5 task adapters lora_{web,sft,dpo}: keep (default) or drop")
    parser.add_argument("--keep-unknown", action="store_true",
                        help="keep tensors the key table does not know under their own names (default: refuse)")
    parser.add_argument("--check-finite", action="store_true", help="refuse tensors holding inf or nan")
    parser.add_argument("--check-crc", action="store_true",
                        help="verify the CRC-32 of every .bin storage (torch.load does not; ~1/3 more CPU)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST_DIR if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ms_xcomposer.conversion.convert import convert

    with sigterm_as_interrupt(), progress_bar(args.quiet, "convert") as progress:
        result = convert(args.src, args.dst, dtype=args.dtype, fmt=args.fmt, shard_size=args.shard_size,
                         task_lora=args.task_lora, keep_unknown=args.keep_unknown, check_finite=args.check_finite,
                         check_crc=args.check_crc, overwrite=args.overwrite, progress=progress)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if result.dropped:
        reasons = sorted({r for _, r in result.dropped})
        print(f"dropped {len(result.dropped)} tensors ({'; '.join(reasons)}); see conversion_report.json")
    print(f"converted {result.summary()}")
    return EXIT_OK


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert an HF XComposer2 checkpoint to a MindSpore checkpoint directory",
        description="Convert a Hugging Face IXC2-VL / IXC2-4KHD / IXC-2.5 directory to a MindSpore checkpoint "
                    "directory, streaming one tensor at a time (memory ~ 2x the largest tensor).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
