"""The LLaVA key table: both llava-hf key layouts onto one MindSpore naming, the published layout.

The Cells mirror the published layout (`vision_tower.vision_model.*`, `multi_modal_projector.linear_{1,2}.*`,
`language_model.model.*`, `language_model.lm_head.*`), so its rules keep every name. The module layout of
transformers >= 4.52 (`model.vision_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*`,
`lm_head.*`) is the same rules with the prefixes of `config.LAYOUT_PREFIXES` swapped: renamed onto the published
names. Published rules come first, so `export_hf` writes the published layout. A checkpoint mixing the layouts
is refused by `LlavaConfig.from_checkpoint` (and one naming a parameter twice by the converter's plan).

The output head is a "tied" rule: a model whose `text_config.tie_word_embeddings` is true shares the token
embedding and has no head parameter; a checkpoint that still carries the head (a `.bin` saved with both names)
has it dropped, as transformers ignores it when tying.
"""
from __future__ import annotations

from ms_xcomposer.conversion.keymap import DROP, PARAM, TIED, KeyTable, Rule
from ms_xcomposer.models.llava.config import MODULES, from_published

_V = "vision_tower.vision_model."
_L = "language_model.model."
_TIED_REASON = "output head tied to the token embedding (text_config.tie_word_embeddings): not a separate weight"

# (published pattern, kind, reason)
_PUBLISHED = (
    # CLIP vision tower (HF's CLIPVisionModel)
    (_V + "embeddings.class_embedding", PARAM, ""),
    (_V + "embeddings.{patch_embedding|position_embedding}.weight", PARAM, ""),
    (_V + "embeddings.position_ids", DROP, "CLIP position index buffer; not a weight"),
    (_V + "{pre_layrnorm|post_layernorm}.{weight|bias}", PARAM, ""),
    (_V + "encoder.layers.{n}.self_attn.{q_proj|k_proj|v_proj|out_proj}.{weight|bias}", PARAM, ""),
    (_V + "encoder.layers.{n}.{layer_norm1|layer_norm2}.{weight|bias}", PARAM, ""),
    (_V + "encoder.layers.{n}.mlp.{fc1|fc2}.{weight|bias}", PARAM, ""),
    # projector
    ("multi_modal_projector.{linear_1|linear_2}.{weight|bias}", PARAM, ""),
    # LLaMA decoder and head
    (_L + "embed_tokens.weight", PARAM, ""),
    (_L + "norm.weight", PARAM, ""),
    (_L + "layers.{n}.self_attn.{q_proj|k_proj|v_proj|o_proj}.weight", PARAM, ""),
    (_L + "layers.{n}.mlp.{gate_proj|up_proj|down_proj}.weight", PARAM, ""),
    (_L + "layers.{n}.{input_layernorm|post_attention_layernorm}.weight", PARAM, ""),
    (_L + "layers.{n}.self_attn.rotary_emb.inv_freq", DROP, "RoPE buffer, recomputed from rope_theta; not a weight"),
    ("language_model.lm_head.weight", TIED, _TIED_REASON),
)

KEYS = KeyTable(
    tuple(Rule(p, p, kind, reason) for p, kind, reason in _PUBLISHED)
    + tuple(Rule(from_published(p, MODULES), p, kind, reason) for p, kind, reason in _PUBLISHED)
)
