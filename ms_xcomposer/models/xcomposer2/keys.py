"""The XComposer2 key table: every HF checkpoint name pattern, and what conversion does with it.

The Cells mirror the HF module tree, so every parameter keeps its name; the table still lists each pattern
so that unknown names are caught, buffers are dropped with their reason, and the optional IXC-2.5 task
adapters can be dropped on request.
"""
from __future__ import annotations

from ms_xcomposer.conversion.keymap import DROP, TASK_ADAPTER, KeyTable, same
from ms_xcomposer.models.xcomposer2.config import TASK_ADAPTERS, VIT_PREFIX

_ATT, _FFN = "{wqkv|wo}", "{w1|w2|w3}"
_TASKS = "{" + "|".join(TASK_ADAPTERS) + "}"
_V = VIT_PREFIX

# The table. Order matters only for readability: a name matches at most one rule (checked in the tests).
KEYS = KeyTable((
    # InternLM2 language model
    same("model.tok_embeddings.weight"),
    same("model.norm.weight"),
    same("output.weight"),
    same("model.layers.{n}.{attention_norm|ffn_norm}.weight"),
    same(f"model.layers.{{n}}.attention.{_ATT}.weight"),
    same(f"model.layers.{{n}}.feed_forward.{_FFN}.weight"),
    same(f"model.layers.{{n}}.attention.{_ATT}.Plora_{{A|B}}.weight"),
    same(f"model.layers.{{n}}.feed_forward.{_FFN}.Plora_{{A|B}}.weight"),
    same(f"model.layers.{{n}}.attention.{_ATT}.lora_{_TASKS}_{{A|B}}.weight", TASK_ADAPTER,
         "IXC-2.5 task adapter (web / write modes)"),
    same(f"model.layers.{{n}}.feed_forward.{_FFN}.lora_{_TASKS}_{{A|B}}.weight", TASK_ADAPTER,
         "IXC-2.5 task adapter (web / write modes)"),
    same("model.layers.{n}.attention.rotary_emb.inv_freq", DROP,
         "RoPE buffer, recomputed from rope_theta; not a weight"),
    # CLIP vision tower
    same(_V + "embeddings.class_embedding"),
    same(_V + "embeddings.{patch_embedding|position_embedding}.weight"),
    same(_V + "embeddings.position_ids", DROP, "CLIP position index buffer; not a weight"),
    same(_V + "{pre_layrnorm|post_layernorm}.{weight|bias}"),
    same(_V + "encoder.layers.{n}.self_attn.{q_proj|k_proj|v_proj|out_proj}.{weight|bias}"),
    same(_V + "encoder.layers.{n}.{layer_norm1|layer_norm2}.{weight|bias}"),
    same(_V + "encoder.layers.{n}.mlp.{fc1|fc2}.{weight|bias}"),
    # projector and HD separators
    same("vision_proj.{0|2}.{weight|bias}"),
    same("{plora_glb_GN|plora_sub_GN}"),
))
