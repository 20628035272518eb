"""A tiny random InternVL-1.5 checkpoint in the real layout, written without torch (the demo's).

`write_random_checkpoint(dst)` writes what an InternVL-Chat-V1-5 repository holds: config.json with the
`InternVLChatConfig` fields (`vision_config` of the InternViT-6B flavour: RMSNorm, q/k norm, no qkv bias;
`llm_config` of InternLM2; the V1.5 chat fields: select_layer -1, ps_version v2, template internlm2-chat, 448-px
tiles, dynamic tiling with the thumbnail), random bf16 weights under the official names as two safetensors
shards with their index, generation_config.json, and an InternLM2-structured SentencePiece tokenizer trained on
the spot (1000 pieces) with the six chat tokens and the nine InternVL tokens (`<img>`, `</img>`, `<IMG_CONTEXT>`,
...) added after its pieces, as the finetune script adds them (92538.. / 92544.. in the real tokenizer; 1000.. /
1006.. here). Same seed, same bytes. The model is random: what it generates is meaningless text.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List

from ms_xcomposer.models.internvl.config import InternVLConfig

SPM_VOCAB = 1000
# The tokens the official finetune script adds, in its order (after the InternLM2 chat tokens).
INTERNVL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
PRESET = "tiny-internvl"
VISION_CONFIG = dict(architectures=["InternVisionModel"], model_type="intern_vit_6b", hidden_size=64,
                     intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=448, patch_size=14,
                     num_channels=3, norm_type="rms_norm", qk_normalization=True, qkv_bias=False,
                     layer_norm_eps=1e-6, hidden_act="gelu", initializer_factor=0.1, use_flash_attn=True,
                     drop_path_rate=0.0)
LLM_CONFIG = dict(architectures=["InternLM2ForCausalLM"], model_type="internlm2", vocab_size=SPM_VOCAB + 6 + 9,
                  hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-5,
                  rope_theta=1000000, rope_scaling={"type": "dynamic", "factor": 2.0}, bias=False,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                  attn_implementation="eager", torch_dtype="bfloat16")
GENERATION_CONFIG = {"_from_model_config": True, "transformers_version": "4.37.2"}


def hf_config_dict() -> Dict[str, object]:
    """config.json as `InternVLChatConfig.save_pretrained` writes the V1.5 fields for the tiny model."""
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                     "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
        "downsample_ratio": 0.5, "dynamic_image_size": True, "force_image_size": 448, "max_dynamic_patch": 12,
        "min_dynamic_patch": 1, "pad2square": False, "ps_version": "v2", "select_layer": -1,
        "template": "internlm2-chat", "torch_dtype": "bfloat16", "use_backbone_lora": 0, "use_llm_lora": 0,
        "use_thumbnail": True, "vision_config": dict(VISION_CONFIG), "llm_config": dict(LLM_CONFIG),
    }


def config() -> InternVLConfig:
    """The tiny model's `InternVLConfig` (as the converter reads it from `hf_config_dict`)."""
    return InternVLConfig.from_hf(hf_config_dict(), PRESET)


def write_random_checkpoint(dst: str, seed: int = 0) -> List[str]:
    """Write the tiny random InternVL checkpoint into the existing directory `dst`; returns the file names."""
    from ms_xcomposer.conversion import layout
    from ms_xcomposer.conversion.synthetic import write_random_tensors
    from ms_xcomposer.models.internvl import FAMILY
    from ms_xcomposer.synthetic_tokenizer import write_tokenizer_files

    files = write_random_tensors(dst, FAMILY.parameter_shapes(config()), fmt="safetensors", shards=2, seed=seed)
    names = [os.path.basename(f) for f in files] + [layout.HF_ST_INDEX]
    for name, content in ((layout.CONFIG, hf_config_dict()), ("generation_config.json", GENERATION_CONFIG)):
        with open(os.path.join(dst, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)
        names.append(name)
    return names + write_tokenizer_files(dst, SPM_VOCAB, seed=seed, extra_tokens=INTERNVL_TOKENS)
