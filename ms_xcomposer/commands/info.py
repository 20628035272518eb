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
_VARIANT_NAMES = {"ixc2-vl": "IXC2-VL", "ixc2-4khd": "IXC2-4KHD", "ixc2.5": "IXC-2.5"}
_KIND = {"hf": "Hugging Face directory", "ms": "converted MindSpore directory"}


def _count(n: int) -> str:
    """1234567 -> '1.23M' (and the exact number)."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit} ({n:,})"
    return f"{n:,}"


def format_summary(summary) -> List[str]:
    """The lines `info` prints for a `CheckpointSummary`."""
    cfg = summary.config
    llm, vit, spec = cfg.llm, cfg.vision, cfg.spec
    lines = [
        f"{summary.path}: {_KIND[summary.kind]}, {summary.format} ({summary.files} file(s), "
        f"{summary.bytes / 1e9:.3f} GB)",
        f"variant: {_VARIANT_NAMES[cfg.variant]} ({cfg.variant})",
        f"parameters: {_count(summary.total_params)} in {summary.tensors} tensors",
    ]
    lines += [f"  {name:<22} {_count(n)}" for name, n in summary.params.items()]
    lines.append("dtypes: " + ", ".join(f"{d} ({n} tensors)" for d, n in summary.dtypes.items()))
    rope = (f", rope scaling {llm.rope_scaling['type']} x{llm.rope_scaling['factor']}" if llm.rope_scaling
            else ", no rope scaling")
    lines.append(f"language model: InternLM2, hidden {llm.hidden_size}, {llm.num_hidden_layers} layers, "
                 f"{llm.num_attention_heads} heads ({llm.num_key_value_heads} KV heads, head_dim {llm.head_dim}), "
                 f"FFN {llm.intermediate_size}, vocab rows {llm.vocab_size}, rope theta {llm.rope_theta:,.0f}{rope}, "
                 f"max positions {llm.max_position_embeddings}")
    lines.append(f"vision tower: CLIP ViT, image {vit.image_size}, patch {vit.patch_size} (grid {vit.grid}x{vit.grid}), "
                 f"width {vit.hidden_size}, {vit.num_hidden_layers} layers, {vit.num_attention_heads} heads, "
                 f"FFN {vit.intermediate_size}, post_layernorm {'present (unused)' if cfg.has_post_layernorm else 'absent'}")
    merge = ", 2x2 patch merge" if spec.hd_tiles else ""
    lines.append(f"projector: {cfg.proj_in} -> {cfg.proj_hidden} -> {llm.hidden_size} (GELU){merge}")
    lines.append("PLoRA: " + ", ".join(f"{n} r={p.rank} alpha={p.alpha} (scale {p.scale:g})"
                                       for n, p in cfg.plora.items()))
    lines.append("task adapters: " + (", ".join(f"lora_{t}" for t in cfg.task_adapters) +
                                      f" (rank {cfg.task_adapter_rank})" if cfg.task_adapters else "none"))
    if spec.hd_tiles:
        tiles = (f"HD tiles of {spec.tile_size} px, default hd_num {spec.default_hd_num}"
                 + (f" ({spec.multi_image_hd_num} with several images)" if spec.multi_image_hd_num else "")
                 + f"; image tokens: {cfg.image_tokens(1, 1)} for 1 tile, {cfg.image_tokens(2, 2)} for 2x2")
    else:
        tiles = f"one {spec.tile_size}x{spec.tile_size} view, {cfg.image_tokens()} tokens per image"
    lines.append(f"images: {tiles}")
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
