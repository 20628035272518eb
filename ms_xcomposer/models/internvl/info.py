"""What `ms-xcomposer info` says about an InternVL-1.5 checkpoint: its components and its config, in words."""
from __future__ import annotations

from typing import List

from ms_xcomposer.conversion.keymap import DROP
from ms_xcomposer.models.internvl.config import InternVLConfig
from ms_xcomposer.models.internvl.keys import KEYS, PROJECTOR_PREFIX, VISION_PREFIX

# Components in display order; every tensor belongs to exactly one.
COMPONENTS = ("language model", "vision model", "projector", "buffers (not weights)", "unknown")


def component(name: str) -> str:
    """The component an InternVL tensor name belongs to (one of COMPONENTS)."""
    m = KEYS.match_hf(name)
    if m is None:
        return "unknown"
    if m.rule.kind == DROP:
        return "buffers (not weights)"
    if name.startswith(VISION_PREFIX):
        return "vision model"
    if name.startswith(PROJECTOR_PREFIX):
        return "projector"
    return "language model"  # the table's other names are all under language_model.


def kind(cfg: InternVLConfig) -> str:
    """The released model this config is shaped like, by its InternViT flavour."""
    flavour = "InternViT-6B flavour (RMSNorm, q/k norm)" if cfg.vision.norm_type == "rms_norm" else \
        "InternViT-300M flavour (LayerNorm, qkv bias)"
    return f"InternVL-1.5 chat model, {flavour}"


def describe(cfg: InternVLConfig) -> List[str]:
    """The config lines of `info`: kind, language model, vision model, projector, images."""
    llm, vit = cfg.llm, cfg.vision
    rope = (f", rope scaling {llm.rope_scaling['type']} x{llm.rope_scaling['factor']}" if llm.rope_scaling
            else ", no rope scaling")
    qk = ", q/k RMSNorm" if vit.qk_normalization else ""
    bias = ", qkv bias" if vit.qkv_bias else ""
    return [
        f"kind: {kind(cfg)}",
        f"language model: InternLM2, hidden {llm.hidden_size}, {llm.num_hidden_layers} layers, "
        f"{llm.num_attention_heads} heads ({llm.num_key_value_heads} KV heads, head_dim {llm.head_dim}), "
        f"FFN {llm.intermediate_size}, vocab rows {llm.vocab_size}, rope theta {llm.rope_theta:,.0f}{rope}, "
        f"max positions {llm.max_position_embeddings}",
        f"vision model: InternViT, image {vit.image_size}, patch {vit.patch_size} (grid {vit.grid}x{vit.grid}), "
        f"width {vit.hidden_size}, {vit.num_hidden_layers} layers, {vit.num_attention_heads} heads, FFN "
        f"{vit.intermediate_size}, {vit.norm_type}{qk}{bias}; select_layer {cfg.select_layer}",
        f"projector: pixel shuffle {cfg.downsample_ratio} ({cfg.ps_version}) -> LayerNorm -> {cfg.projector_in} -> "
        f"{llm.hidden_size} (GELU) -> {llm.hidden_size}",
        f"images: tiles of {cfg.image_size} px, {cfg.num_image_token} tokens per tile, dynamic tiling "
        f"{cfg.min_dynamic_patch}..{cfg.max_dynamic_patch} tiles in training (chat default max_num 6), "
        f"thumbnail {'yes' if cfg.use_thumbnail else 'no'}; template {cfg.template}",
    ]
