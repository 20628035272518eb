"""`ms-xcomposer info DIR`: variant, parameter counts, dtypes, shapes, PLoRA ranks and vision tower of a checkpoint."""
from __future__ import annotations

import argparse
import json
from typing import List

from ms_xcomposer.cli import EXIT_OK

EXAMPLES = """examples:
  ms-xcomposer info ./internlm-xcomposer2d5-7b        # a Hugging Face directory (.bin or safetensors)
  ms-xcomposer info ./ixc25-ms                        # a directory written by `ms-xcomposer convert`
  ms-xcomposer info ./ixc25-ms --json > ixc25.json    # everything as JSON

Only the shard headers are read (a few KB), never the weights. For an HF directory the vision tower, projector,
PLoRA ranks and the variant are inferred from the tensor shapes (config.json does not describe them); a
converted directory stores the complete config. PLoRA alpha is not stored in checkpoints: the released
variant's alpha is assumed for its known rank.
"""
_KIND = {"hf": "Hugging Face directory", "ms": "converted MindSpore directory"}


def _count(n: int) -> str:
    """1234567 -> '1.23M' (and the exact number)."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit} ({n:,})"
    return f"{n:,}"


def format_summary(summary) -> List[str]:
    """The lines `info` prints for a `CheckpointSummary`."""
    from ms_xcomposer.families import family_named

    family = family_named(summary.family)
    lines = [
        f"{summary.path}: {_KIND[summary.kind]}, {summary.format} ({summary.files} file(s), "
        f"{summary.bytes / 1e9:.3f} GB)",
        f"family: {family.name} ({family.description})",
        *family.describe(summary.config)[:1],
        f"parameters: {_count(summary.total_params)} in {summary.tensors} tensors",
    ]
    lines += [f"  {name:<22} {_count(n)}" for name, n in summary.params.items()]
    lines.append("dtypes: " + ", ".join(f"{d} ({n} tensors)" for d, n in summary.dtypes.items()))
    lines += family.describe(summary.config)[1:]
    lines.append("shapes:")
    width = max(len(g.pattern) for g in summary.groups)
    for g in summary.groups:
        count = f"  x{g.count}" if g.count > 1 else ""
        lines.append(f"  {g.pattern:<{width}}  {str(list(g.shape)):<20} {g.dtype}{count}")
    return lines


def run(args: argparse.Namespace) -> int:
    from ms_xcomposer.checkpoint_info import summarize

    summary = summarize(args.dir)
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print("\n".join(format_summary(summary)))
    return EXIT_OK


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "info", help="describe a checkpoint: variant, parameters, dtypes, shapes, PLoRA ranks, vision tower",
        description="Describe an HF or converted XComposer2 checkpoint directory from its headers (no weights read).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dir", metavar="DIR", help="HF directory or converted MindSpore directory")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=run)
