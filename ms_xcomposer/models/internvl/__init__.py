"""The InternVL-1.5 family (InternVL-Chat-V1-5, Mini-InternVL-Chat-2B-V1-5): InternViT + pixel shuffle + mlp1 +
InternLM2 (the shared decoder, PLoRA off), as the official `InternVLChatModel` at v1.5.1.

- building blocks: `config.py` (`InternVLConfig` from the HF config.json), `vision.py` (InternViT, both
  flavours), `projector.py` (pixel shuffle, `mlp1`), `encoder.py` (pixels -> LLM embeddings),
  `processing.py` (`load_image`, `dynamic_preprocess`), `prompt.py` (the internlm2-chat template, image blocks);
- `keys.py`: the HF key table; `info.py`: what `ms-xcomposer info` says;
- `modeling.py`: `InternVLChatModel` (Cells named as the HF keys, on the generic engine; the official
  `chat` / `multi_image_chat` / forward signatures);
- `processor.py`: `InternVLProcessor` (images + prompt -> the model's inputs; response text).

Importing this package imports no MindSpore; the classes are loaded on first use.
"""
from __future__ import annotations

from ms_xcomposer.families import Family
from ms_xcomposer.models.internvl import info
from ms_xcomposer.models.internvl.config import ARCHITECTURE, InternVLConfig
from ms_xcomposer.models.internvl.keys import KEYS

FAMILY = Family(
    name="internvl",
    architectures=(ARCHITECTURE,),
    config_from_hf=InternVLConfig.from_checkpoint,
    config_from_section=InternVLConfig.from_section,
    model="ms_xcomposer.models.internvl.modeling:InternVLChatModel",
    processor="ms_xcomposer.models.internvl.processor:InternVLProcessor",
    keys=KEYS,
    description="InternVL-1.5: InternVL-Chat-V1-5, Mini-InternVL-Chat-2B-V1-5",
    components=info.COMPONENTS,
    component_of=info.component,
    describe=info.describe,
    vision_memory="ms_xcomposer.models.internvl.memory:VISION_MEMORY",
    parity="ms_xcomposer.models.internvl.parity:compare_loaded",
)

_LAZY = {"InternVLChatModel": "modeling", "InternVLProcessor": "processor"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
