"""Tiny random InternVL-1.5 checkpoints in the real HF layout (config.json of the official classes + safetensors +
the golden case's tokenizer files), for tests of what the golden case does not cover."""
from __future__ import annotations

import copy
import json
import os
import shutil
from typing import Callable, Dict, Optional

GOLDEN_HF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "internvl15_tiny", "hf")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "generation_config.json")


def golden_hf_config() -> Dict[str, object]:
    with open(os.path.join(GOLDEN_HF, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def write_hf_dir(path: str, edit: Callable[[dict], None], seed: int = 0, dtype: Optional[str] = None) -> str:
    """Write an HF InternVL directory at `path`: the golden config.json changed by `edit(dict)`, random weights
    (`ReferenceInternVL.random_state_dict`, stored as `dtype`: None = float32, "float16", "bfloat16"), the golden
    tokenizer files. Returns `path`."""
    import torch
    from safetensors.torch import save_file

    from ms_xcomposer.models.internvl.config import InternVLConfig
    from ms_xcomposer.reference import ReferenceInternVL

    hf = copy.deepcopy(golden_hf_config())
    edit(hf)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2)
    state = ReferenceInternVL.random_state_dict(InternVLConfig.from_hf(hf), seed)
    store = {None: torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    save_file({k: v.to(store).contiguous() for k, v in state.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(GOLDEN_HF, name), path)
    return path


def layernorm_v1_edit(max_position_embeddings: int = 1024) -> Callable[[dict], None]:
    """The InternViT-300M flavour (LayerNorm, qkv bias, no q/k norm) with 4 layers, select_layer -4 (1 layer run),
    pixel shuffle v1, and an LLM whose dynamic NTK starts past `max_position_embeddings`."""

    def edit(hf: dict) -> None:
        hf["vision_config"].update(norm_type="layer_norm", qk_normalization=False, qkv_bias=True,
                                   num_hidden_layers=4, initializer_factor=1.0)
        hf.update(select_layer=-4, ps_version="v1")
        hf["llm_config"].update(max_position_embeddings=max_position_embeddings,
                                rope_scaling={"type": "dynamic", "factor": 2.0})

    return edit
