"""The XComposer2 family (IXC2-VL-7B, IXC2-4KHD-7B, IXC-2.5-7B): CLIP tower + projector + PLoRA InternLM2.

- `config.py`: `XComposerConfig` (inferred from HF config.json + shapes), `VariantSpec`, presets;
- `keys.py`: the HF key table; `info.py`: what `ms-xcomposer info` says about a checkpoint; `preflight.py`:
  what `ms-xcomposer chat` checks of a request before loading;
- `modeling.py`: `XComposer2ForCausalLM` (Cells named as the HF keys, on the generic engine);
- `processing.py`: image / video transforms per variant; `prompt.py`: the chat template and variant rules;
- `processor.py`: `XComposer2Processor` (tokenizer + images + prompt -> the model's inputs; response text).

Importing this package imports no MindSpore; the classes are loaded on first use.
"""
from __future__ import annotations

import dataclasses

from ms_xcomposer.families import Family
from ms_xcomposer.models.xcomposer2 import info
from ms_xcomposer.models.xcomposer2.config import XComposerConfig
from ms_xcomposer.models.xcomposer2.keys import KEYS

FAMILY = Family(
    name="xcomposer2",
    architectures=("InternLMXComposer2ForCausalLM",),
    config_from_hf=XComposerConfig.from_hf,
    config_from_section=XComposerConfig.from_section,
    model="ms_xcomposer.models.xcomposer2.modeling:XComposer2ForCausalLM",
    processor="ms_xcomposer.models.xcomposer2.processor:XComposer2Processor",
    keys=KEYS,
    without_optional=lambda config: dataclasses.replace(config, task_adapters=()),
    description="InternLM-XComposer2: IXC2-VL-7B, IXC2-4KHD-7B, IXC-2.5-7B",
    components=info.COMPONENTS,
    component_of=info.component,
    describe=info.describe,
    request_check="ms_xcomposer.models.xcomposer2.preflight:XComposer2RequestCheck",
    parity="ms_xcomposer.models.xcomposer2.parity:compare_loaded",
    vision_memory="ms_xcomposer.models.xcomposer2.memory:VISION_MEMORY",
)

_LAZY = {"XComposer2ForCausalLM": "modeling", "split_views": "modeling", "OFFICIAL_CHAT_GENERATION": "modeling",
         "XComposer2Processor": "processor"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
