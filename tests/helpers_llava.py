"""Tiny llava-hf checkpoints for the LLaVA tests, written by transformers itself (no downloads).

- `write_llama_tokenizer(dst, legacy)`: a llava-hf-style tokenizer directory (SentencePiece trained here with
  LLaMA's structure, 400 pieces; <image> = 400, <pad> = 401 as 32000 / 32001 in llava-hf);
- `tiny_llava_config(...)`: a tiny `transformers.LlavaConfig` (CLIP 3 layers at 56 px, patch 14: 16 image tokens,
  17 under "full"; LLaMA 2 layers, hidden 64) with the options the family must cover;
- `write_tiny_llava(dst, config, layout, seed)`: `LlavaForConditionalGeneration` with random weights (norms too)
  saved by `save_pretrained` (the published layout) or as its own state dict (the transformers >= 4.52 module
  layout), with the tokenizer and a CLIPImageProcessor at the tower's size.
"""
from __future__ import annotations

import os

from ms_xcomposer.synthetic_tokenizer import write_llama_tokenizer as _write_llama_tokenizer

SPM_VOCAB = 400  # <image> = 400, <pad> = 401 (32000 / 32001 in llava-hf)
IMAGE_SIZE = 56


def write_llama_tokenizer(dst, legacy: bool, extra_special: bool = False) -> str:
    """`synthetic_tokenizer.write_llama_tokenizer` at 400 pieces (<image> = 400, <pad> = 401)."""
    return _write_llama_tokenizer(str(dst), SPM_VOCAB, legacy, extra_special)


def tiny_llava_config(kv_heads: int = 2, feature_layer: int = -2, strategy: str = "default", tied: bool = False):
    import transformers

    text = dict(vocab_size=SPM_VOCAB + 2, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512, rms_norm_eps=1e-5,
                rope_theta=10000.0, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
                pad_token_id=SPM_VOCAB + 1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=14)
    return transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=SPM_VOCAB,
                                    vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                                    pad_token_id=SPM_VOCAB + 1, tie_word_embeddings=tied)


def write_tiny_llava(dst, config, layout: str = "published", seed: int = 0):
    """(the transformers model in eval mode, dst) after writing an HF directory of it in `layout`."""
    import torch
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # norms start at 1 / 0 and the tower's weights are small: randomise so a slip shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "vision_tower" in name or "multi_modal_projector" in name:
                p.normal_(0, 0.2)
    dst = str(dst)
    model.save_pretrained(dst, safe_serialization=True)
    if layout == "modules":  # the state dict's own names, as a re-saved state dict carries them
        os.remove(os.path.join(dst, "model.safetensors"))
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.text_config.tie_word_embeddings:
            state.pop("lm_head.weight")
        save_file(state, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    write_llama_tokenizer(dst, legacy=False)
    transformers.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                    crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(dst)
    return model, dst
