"""`ms-xcomposer convert SRC_HF_DIR DST_DIR`: HF XComposer2 checkpoint -> MindSpore checkpoint directory.

Also home of the progress bar and SIGTERM handling shared by `export-hf` and `verify`.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from ms_xcomposer.cli import EXIT_OK

EXAMPLES = """examples:
  ms-xcomposer convert ./internlm-xcomposer2d5-7b ./ixc25-ms
  ms-xcomposer convert ./internlm-xcomposer2-vl-7b ./vl-ms --dtype float16 --format safetensors
  ms-xcomposer convert ./internlm-xcomposer2d5-7b ./ixc25-ms --task-lora drop --shard-size 2GB --overwrite

The output directory holds config.json (HF fields + an "ms_xcomposer" section), mindspore_model.index.json,
mindspore_model-0000i-of-0000N.ckpt shards, the tokenizer files and conversion_report.json. It is built in a
temporary sibling directory and renamed into place only when complete. --overwrite replaces only an empty
directory or one this tool wrote; /, the home and the current directory are refused. Temporary directories
left by a killed conversion to the same DST_DIR are removed (and reported) by the next one.
"""
LINE_EVERY_PERCENT = 10  # plain progress lines (stderr not a terminal): at each 10 % ...
LINE_EVERY_SECONDS = 30.0  # ... or after this long without one


class _ProgressLines:
    """Progress as plain lines for logs: `convert: 40% (0.57 of 1.42 GB, 12 s)`."""

    def __init__(self, desc: str) -> None:
        self.desc, self.done, self.start = desc, 0, time.monotonic()
        self.last_step, self.last_time = 0, self.start

    def __call__(self, n: int, total: int) -> None:
        self.done += n
        now = time.monotonic()
        step = self.done * 100 // max(total, 1) // LINE_EVERY_PERCENT
        if step > self.last_step or now - self.last_time >= LINE_EVERY_SECONDS:
            self.last_step, self.last_time = step, now
            print(f"{self.desc}: {self.done * 100 // max(total, 1)}% ({self.done / 1e9:.2f} of {total / 1e9:.2f} GB, "
                  f"{now - self.start:.0f} s)", file=sys.stderr, flush=True)


@contextmanager
def progress_bar(quiet: bool, desc: str) -> Iterator[Callable[[int, int], None]]:
    """Progress over bytes on stderr: a tqdm bar on a terminal, plain lines otherwise (every 10 % or 30 s, so
    logs under nohup show it), nothing with --quiet. Sizes in GB of 10^9 bytes, as in the summaries."""
    if quiet:
        yield lambda n, total: None
        return
    if not sys.stderr.isatty():
        yield _ProgressLines(desc)
        return
    from tqdm import tqdm

    bar: Optional[tqdm] = None

    def update(n: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, file=sys.stderr,
                       dynamic_ncols=True)
        bar.update(n)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


def print_warning(message: str) -> None:
    """A library warning as one `warning: ...` line on stderr, as it arises."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


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
    parser.add_argument("--check-crc", action=argparse.BooleanOptionalAction, default=True,
                        help="verify the CRC-32 of every .bin storage, which torch.load does not (default; ~1/3 "
                             "more CPU than the sha256 hashing alone: --no-check-crc skips it)")
    parser.add_argument("--allow-missing-tokenizer", action="store_true",
                        help="convert a source without tokenizer.model (the output cannot chat until one is added)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DST_DIR if it is empty or was written by this tool")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from ms_xcomposer.conversion.convert import convert

    with sigterm_as_interrupt(), progress_bar(args.quiet, "convert") as progress:
        result = convert(args.src, args.dst, dtype=args.dtype, fmt=args.fmt, shard_size=args.shard_size,
                         task_lora=args.task_lora, keep_unknown=args.keep_unknown, check_finite=args.check_finite,
                         check_crc=args.check_crc, allow_missing_tokenizer=args.allow_missing_tokenizer,
                         overwrite=args.overwrite, progress=progress, warn=print_warning)
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
