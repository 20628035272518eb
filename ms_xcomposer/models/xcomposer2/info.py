"""What `ms-xcomposer info` says about an XComposer2 checkpoint: its components and its config, in words."""
from __future__ import annotations

from typing import List

from ms_xcomposer.conversion.keymap import DROP, TASK_ADAPTER
from ms_xcomposer.models.xcomposer2.config import VIT_PREFIX, XComposerConfig
from ms_xcomposer.models.xcomposer2.keys import KEYS

# Components in display order; every tensor belongs to exactly one.
COMPONENTS = ("language model", "PLoRA", "task adapters", "vision tower", "projector", "HD separators",
              "buffers (not weights)", "unknown")
_VARIANT_NAMES = {"ixc2-vl": "IXC2-VL", "ixc2-4khd": "IXC2-4KHD", "ixc2.5": "IXC-2.5"}


def component(name: str) -> str:
    """The component an XComposer2 tensor name belongs to (one of COMPONENTS)."""
    m = KEYS.match_hf(name)
    if m is None:
        return "unknown"
    if m.rule.kind == DROP:
        return "buffers (not weights)"
    if m.rule.kind == TASK_ADAPTER:
        return "task adapters"
    if name.startswith(VIT_PREFIX):
        return "vision tower"
    if name.startswith("vision_proj."):
        return "projector"
    if name.startswith("plora_"):
        return "HD separators"
    if ".Plora_" in name:
        return "PLoRA"
    return "language model"


def variant_name(cfg: XComposerConfig) -> str:
    """"IXC-2.5" and the like."""
    return _VARIANT_NAMES[cfg.variant]


def describe(cfg: XComposerConfig) -> List[str]:
    """The config lines of `info`: variant, language model, vision tower, projector, PLoRA, adapters, images."""
    llm, vit, spec = cfg.llm, cfg.vision, cfg.spec
    lines = [f"variant: {variant_name(cfg)} ({cfg.variant})"]
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
    return lines
