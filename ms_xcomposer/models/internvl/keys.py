"""The InternVL-1.5 key table: every HF checkpoint name pattern of an `InternVLChatModel`, and what conversion
does with it.

The Cells mirror the HF module tree (`vision_model.*`, `mlp1.*`, `language_model.model.*`,
`language_model.output.*`), so every parameter keeps its name. Which of the optional names a checkpoint has
(qkv bias, q/k norms, LayerNorm biases: the two InternViT flavours) is decided by the Cells built from the
config, not by this table; a name the table knows but the model lacks is refused as unknown by the converter.
"""
from __future__ import annotations

from ms_xcomposer.conversion.keymap import DROP, KeyTable, same

_V = "vision_model."
_L = "language_model."
VISION_PREFIX, PROJECTOR_PREFIX = _V, "mlp1."

KEYS = KeyTable((
    # InternViT
    same(_V + "embeddings.{class_embedding|position_embedding}"),
    same(_V + "embeddings.patch_embedding.{weight|bias}"),
    same(_V + "encoder.layers.{n}.{ls1|ls2}"),
    same(_V + "encoder.layers.{n}.{norm1|norm2}.{weight|bias}"),
    same(_V + "encoder.layers.{n}.attn.{qkv|proj}.{weight|bias}"),
    same(_V + "encoder.layers.{n}.attn.{q_norm|k_norm}.weight"),
    same(_V + "encoder.layers.{n}.mlp.{fc1|fc2}.{weight|bias}"),
    # projector: LayerNorm, Linear, (GELU), Linear
    same("mlp1.{0|1|3}.{weight|bias}"),
    # InternLM2 language model (no PLoRA, no biases)
    same(_L + "model.tok_embeddings.weight"),
    same(_L + "model.norm.weight"),
    same(_L + "model.layers.{n}.{attention_norm|ffn_norm}.weight"),
    same(_L + "model.layers.{n}.attention.{wqkv|wo}.weight"),
    same(_L + "model.layers.{n}.feed_forward.{w1|w2|w3}.weight"),
    same(_L + "output.weight"),
    # non-persistent in the official code, but a checkpoint saved by other tools may carry them
    same(_L + "model.layers.{n}.attention.rotary_emb.{inv_freq|cos_cached|sin_cached}", DROP,
         "RoPE buffer, recomputed from rope_theta; not a weight"),
))
