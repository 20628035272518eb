"""A tiny random llava-hf checkpoint in the real layout, written without torch or transformers (the demo's).

`write_random_checkpoint(dst)` writes what a llava-hf repository holds: config.json with transformers'
`LlavaConfig` fields (text_config / vision_config), random bf16 weights under the published names as two
safetensors shards with their index, generation_config.json, preprocessor_config.json (CLIPImageProcessor at the
tower's size), processor_config.json, and a LLaMA-structured SentencePiece tokenizer trained on the spot with
<image> and <pad> added after its pieces (`synthetic_tokenizer.write_llama_tokenizer`). Same seed, same bytes.
The model is random: what it generates is meaningless text.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List

from ms_xcomposer.images import CLIP_MEAN, CLIP_STD
from ms_xcomposer.models.llava.config import LlavaConfig

SPM_VOCAB = 1000  # SentencePiece pieces; <image> = 1000, <pad> = 1001 (32000 / 32001 in llava-1.5)
IMAGE_SIZE = 112  # 8 x 8 patches of 14: 64 image tokens
PRESET = "tiny-llava"
TEXT_CONFIG = dict(model_type="llama", vocab_size=SPM_VOCAB + 2, hidden_size=128, intermediate_size=256,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                   pad_token_id=SPM_VOCAB + 1, torch_dtype="bfloat16")
VISION_CONFIG = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=14, projection_dim=64,
                     hidden_act="quick_gelu", layer_norm_eps=1e-5)
GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": SPM_VOCAB + 1,
                     "transformers_version": "4.57.1"}


def hf_config_dict() -> Dict[str, object]:
    """config.json as transformers' `LlavaConfig.save_pretrained` writes it for the tiny model."""
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "ignore_index": -100,
        "image_token_index": SPM_VOCAB, "image_seq_length": (IMAGE_SIZE // 14) ** 2, "pad_token_id": SPM_VOCAB + 1,
        "projector_hidden_act": "gelu", "multimodal_projector_bias": True, "tie_word_embeddings": False,
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "torch_dtype": "bfloat16",
        "transformers_version": "4.57.1", "text_config": dict(TEXT_CONFIG), "vision_config": dict(VISION_CONFIG),
    }


def config() -> LlavaConfig:
    """The tiny model's `LlavaConfig` (as the converter reads it from `hf_config_dict`)."""
    return LlavaConfig.from_hf(hf_config_dict(), where=PRESET)


def _image_processor_dict() -> Dict[str, object]:
    return {"crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "do_center_crop": True, "do_convert_rgb": True,
            "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN.tolist(),
            "image_processor_type": "CLIPImageProcessor", "image_std": CLIP_STD.tolist(), "processor_class":
            "LlavaProcessor", "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": IMAGE_SIZE}}


def write_random_checkpoint(dst: str, seed: int = 0) -> List[str]:
    """Write the tiny random llava-hf checkpoint into the existing directory `dst`; returns the file names."""
    from ms_xcomposer.conversion import layout
    from ms_xcomposer.conversion.synthetic import write_random_tensors
    from ms_xcomposer.models.llava import FAMILY
    from ms_xcomposer.synthetic_tokenizer import write_llama_tokenizer

    files = write_random_tensors(dst, FAMILY.parameter_shapes(config()), fmt="safetensors", shards=2, seed=seed)
    names = [os.path.basename(f) for f in files] + [layout.HF_ST_INDEX]
    side = {layout.CONFIG: hf_config_dict(), "generation_config.json": GENERATION_CONFIG,
            "preprocessor_config.json": _image_processor_dict(),
            "processor_config.json": {"num_additional_image_tokens": 1, "patch_size": 14,
                                      "processor_class": "LlavaProcessor",
                                      "vision_feature_select_strategy": "default"}}
    for name, content in side.items():
        with open(os.path.join(dst, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)
        names.append(name)
    write_llama_tokenizer(dst, SPM_VOCAB, legacy=False)
    return names + ["tokenizer.model", "tokenizer_config.json"]
