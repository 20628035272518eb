"""The LLaVA-1.5 family (llava-hf `LlavaForConditionalGeneration` checkpoints): CLIP tower + GELU projector + LLaMA.

- `config.py`: `LlavaConfig` (from an llava-hf config.json, transformers' defaults) and the two key layouts;
- `keys.py`: the key table (both layouts onto the published names; the tied output head);
- `modeling.py`: `LlavaForConditionalGeneration` (shared CLIP tower and LLaMA decoder on the generic engine);
- `processing.py`: CLIPImageProcessor-equal pixels; `tokenizer.py`: the slow LlamaTokenizer; `prompt.py`: the
  llava-hf chat template and image-token expansion;
- `processor.py`: `LlavaProcessor` (transformers' call, and the project's chat protocol).

Importing this package imports no MindSpore; the classes are loaded on first use.
"""
from __future__ import annotations

from typing import List

from ms_xcomposer.families import Family
from ms_xcomposer.models.llava.config import LlavaConfig
from ms_xcomposer.models.llava.keys import KEYS


COMPONENTS = ("vision tower", "projector", "language model", "buffers (not weights)", "unknown")
_PREFIXES = (("vision_tower.", "vision tower"), ("multi_modal_projector.", "projector"),
             ("language_model.", "language model"))


def component(name: str) -> str:
    """The `info` component of a tensor name (either key layout)."""
    m = KEYS.match_hf(name)
    if m is None:
        return "unknown"
    if m.target is None:
        return "buffers (not weights)"
    return next(c for prefix, c in _PREFIXES if m.target.startswith(prefix))


def describe(config: LlavaConfig) -> List[str]:
    """What `ms-xcomposer info` says about a LLaVA config."""
    llm, vis = config.llm, config.vision
    return [
        f"LLaVA-1.5: CLIP {vis.num_hidden_layers} layers x {vis.hidden_size} at {vis.image_size} px "
        f"(patch {vis.patch_size}), feature layer {config.vision_feature_layer}, "
        f"select {config.vision_feature_select_strategy!r} ({config.image_tokens} tokens per image)",
        f"LLaMA decoder: {llm.num_hidden_layers} layers, hidden {llm.hidden_size}, heads {llm.num_attention_heads} "
        f"(kv {llm.num_key_value_heads}), vocab {llm.vocab_size}, RoPE theta {llm.rope_theta:g}"
        f"{'' if not llm.rope_scaling else f' scaling {llm.rope_scaling}'}, "
        f"{'tied' if config.tie_word_embeddings else 'untied'} output head",
    ]


FAMILY = Family(
    name="llava",
    architectures=("LlavaForConditionalGeneration",),
    config_from_hf=LlavaConfig.from_checkpoint,
    config_from_section=LlavaConfig.from_section,
    model="ms_xcomposer.models.llava.modeling:LlavaForConditionalGeneration",
    processor="ms_xcomposer.models.llava.processor:LlavaProcessor",
    keys=KEYS,
    description="LLaVA-1.5 (llava-hf LlavaForConditionalGeneration: llava-1.5-7b-hf, llava-1.5-13b-hf)",
    components=COMPONENTS,
    component_of=component,
    describe=describe,
    parity="ms_xcomposer.models.llava.parity:compare_loaded",
    vision_memory="ms_xcomposer.models.llava.memory:VISION_MEMORY",
)

_LAZY = {"LlavaForConditionalGeneration": "modeling", "LlavaProcessor": "processor"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
