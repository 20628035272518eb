"""File names of Hugging Face and converted (MindSpore) checkpoint directories, in one place.

Converted directory (written by `convert`, read by `readers.open_checkpoint` and `from_pretrained`)::

    DST/
      config.json                          HF config.json fields + "ms_xcomposer": XComposerConfig.to_dict()
      mindspore_model.index.json           {"metadata": {"format": "ckpt"|"safetensors", "variant": ...,
                                             "total_size": tensor bytes}, "weight_map": {param: shard file}}
      mindspore_model-00001-of-0000N.ckpt  MindSpore protobuf checkpoints, `mindspore.load_checkpoint`-readable
                                           (or mindspore_model-0000i-of-0000N.safetensors with --format)
      tokenizer.model, tokenizer_config.json, special_tokens_map.json, added_tokens.json, generation_config.json,
      preprocessor_config.json, processor_config.json, chat_template.json
                                           (those the source has; tokenizer.json too)
      conversion_report.json               source files (bytes, sha256), options, every tensor (source name,
                                           dtypes, shape, shard), dropped / renamed / kept-unknown with reasons

Parameter names are the HF keys (the Cells mirror the HF module tree; see `keymap`). No timings go into the
files, so converting the same input twice gives identical directories.

HF directory (`export_hf` writes the safetensors form)::

    config.json, model-0000i-of-0000N.safetensors + model.safetensors.index.json
                 (or pytorch_model-0000i-of-0000N.bin + pytorch_model.bin.index.json, or one unsharded file)
"""
from __future__ import annotations

CONFIG = "config.json"
MS_INDEX = "mindspore_model.index.json"
MS_SHARD_STEM = "mindspore_model"
REPORT = "conversion_report.json"

HF_ST_INDEX = "model.safetensors.index.json"
HF_ST_SINGLE = "model.safetensors"
HF_ST_STEM = "model"
HF_BIN_INDEX = "pytorch_model.bin.index.json"
HF_BIN_SINGLE = "pytorch_model.bin"
HF_BIN_STEM = "pytorch_model"

# Copied verbatim from source to destination when present (everything a tokenizer / generation needs).
TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.json", "generation_config.json",
    # image processor and processor settings, chat template (llava-hf)
    "preprocessor_config.json", "processor_config.json", "chat_template.json",
)

MS_SECTION = "ms_xcomposer"


def shard_name(stem: str, index: int, count: int, ext: str) -> str:
    """`stem-0000i-of-0000N.ext` (1-based, HF convention); a single shard is still numbered."""
    return f"{stem}-{index:05d}-of-{count:05d}.{ext}"
