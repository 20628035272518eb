"""`ms-xcomposer info DIR`: variant, parameter counts, dtypes, shapes, PLoRA ranks and vision tower of a checkpoint."""
from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional, Tuple

from ms_xcomposer.cli import EXIT_OK
from ms_xcomposer.commands.chat import positive_int

EXAMPLES = """examples:
  ms-xcomposer info ./internlm-xcomposer2d5-7b        # a Hugging Face directory (.bin or safetensors)
  ms-xcomposer info ./ixc25-ms                        # a directory written by `ms-xcomposer convert`
  ms-xcomposer info ./ixc25-ms --json > ixc25.json    # everything as JSON
  ms-xcomposer info ./ixc25-ms --estimate --hd-num 24 --max-new-tokens 1024 --dtype bfloat16
                                                      # memory one chat needs: weights, KV cache, activation
  ms-xcomposer info ./internvl-ms --estimate --max-num 12   # InternVL: 12 tiles + thumbnail

Only the shard headers are read (a few KB), never the weights. For an HF directory the vision tower, projector,
PLoRA ranks and the variant are inferred from the tensor shapes (config.json does not describe them); a
converted directory stores the complete config. PLoRA alpha is not stored in checkpoints: the released
variant's alpha is assumed for its known rank.

--estimate prints the memory one chat needs (ms_xcomposer/memory.py has the formula): weights held in --dtype,
the KV cache of the prompt + --max-new-tokens positions, and the activation peak of one image at its largest
layout plus 256 text rows: XComposer2 at --hd-num tiles (the tile layout with the most rows), InternVL at
--max-num tiles plus the thumbnail (256 rows per tile), LLaVA one 576-row view. The prefill's activation grows
linearly with the prompt length (it runs in chunks of 256 rows). Host overhead (about 0.6 GB for a CPU process) is
not included.
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


def estimate_lines(summary, image_options: Dict[str, Optional[int]], max_new_tokens: int, dtype: str,
                   batch: int) -> Tuple[List[str], dict]:
    """The lines (and the JSON) `info --estimate` prints: one chat with one image at the largest layout the
    family's image option allows (`image_options`: {"hd_num": ..., "max_num": ...} as given, None when not).
    The vision side is the family's hook (`Family.vision_memory`)."""
    from ms_xcomposer import memory
    from ms_xcomposer.families import family_named

    family = family_named(summary.family)
    hook = family.vision_memory_hook()
    if hook is None:
        raise ValueError(f"--estimate is not available for the {family.name} family (it has no memory hook)")
    for name, value in image_options.items():
        if value is not None and name != hook.option:
            own = f" (its image option is --{hook.option.replace('_', '-')})" if hook.option else ""
            raise ValueError(f"--{name.replace('_', '-')} does not apply to the {family.name} family{own}")
    cfg = summary.config
    image = hook.worst(cfg, 1, image_options.get(hook.option) if hook.option else None, memory.dtype_bytes(dtype))
    rows = image.rows + memory.TEXT_ALLOWANCE
    limit = hook.prompt_limit(cfg)
    if limit is not None:
        rows = min(rows, limit)
    est = memory.estimate(cfg, prompt_rows=rows, max_new_tokens=max_new_tokens, compute_dtype=dtype,
                          weight_dtype=dtype, weight_bytes=memory.parameter_bytes(family.parameter_shapes(cfg), dtype),
                          vision_activation=image.activation, batch=batch)
    lines = [f"{summary.path}: {hook.title(cfg)}, memory of one chat ({dtype} weights and compute, "
             f"batch {batch}): one image ({image.layout}: {image.rows} rows) + {memory.TEXT_ALLOWANCE} text rows"
             + (f", cut to {rows}" if rows < image.rows + memory.TEXT_ALLOWANCE else "")
             + f", {max_new_tokens} new tokens"]
    lines += ["  " + line for line in est.lines()]
    data = dict(est.to_dict(), image_rows=image.rows, vision_activation=image.activation,
                max_new_tokens=max_new_tokens, dtype=dtype, batch=batch)
    if hook.option:
        data[hook.option] = image.option_value
    return lines, data


def run(args: argparse.Namespace) -> int:
    from ms_xcomposer.checkpoint_info import summarize

    given = [flag for flag, value in (("--hd-num", args.hd_num), ("--max-num", args.max_num),
                                      ("--max-new-tokens", args.max_new_tokens),
                                      ("--dtype", args.dtype), ("--batch", args.batch)) if value is not None]
    if given and not args.estimate:
        raise ValueError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only with --estimate")
    summary = summarize(args.dir)
    if args.estimate:
        lines, data = estimate_lines(summary, {"hd_num": args.hd_num, "max_num": args.max_num},
                                     args.max_new_tokens or 1024, args.dtype or "bfloat16", args.batch or 1)
        print(json.dumps(data, indent=2) if args.json else "\n".join(lines))
    elif args.json:
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
    parser.add_argument("--json", action="store_true", help="print the summary (or the estimate) as JSON")
    est = parser.add_argument_group("memory estimate")
    est.add_argument("--estimate", action="store_true",
                     help="print the memory one chat needs: weights, KV cache, peak activation, total")
    est.add_argument("--hd-num", type=positive_int, metavar="N",
                     help="XComposer2: HD tiles of the image (default: the variant's)")
    est.add_argument("--max-num", type=positive_int, metavar="N",
                     help="InternVL: most tiles of the image, a thumbnail on top (default: 6, the model card's)")
    est.add_argument("--max-new-tokens", type=positive_int, metavar="N", help="new tokens (default: 1024)")
    est.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                     help="dtype of the weights and the computation (default: bfloat16, as on GPU / Ascend)")
    est.add_argument("--batch", type=positive_int, metavar="N", help="prompts at once (default: 1)")
    parser.set_defaults(func=run)
