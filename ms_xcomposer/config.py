"""Configs shared by the model families: the decoder LLM (`LLMConfig`), the CLIP vision tower (`VisionConfig`),
and the errors and readers every family's config uses. Family configs live in `ms_xcomposer/models/<family>/`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional

class ConfigError(ValueError):
    """A config or checkpoint does not describe a model this package can build."""


# Rows of a long input per compiled decoder-step call (`engine.CausalLM.prefill_chunk`). One call's transient
# memory is about ATTENTION_COPIES x heads x rows x capacity x 4 bytes (`memory.py`): chunks keep a prefill's
# memory linear in the prompt length. 256 rows: 1.26 GB above the loaded model at 8192 positions on one
# full-width IXC-2.5 layer (the issue 10 bound is 1.5 GB); see docs/performance.md (long_prompt).
PREFILL_CHUNK = 256

# Prompt tokens the serving engine (`scheduler.BatchingEngine`) prefills between two decode steps of the running
# rows: short prompts arriving together share a prefill up to this many tokens (padding included), longer ones
# are prefilled in chunks of it. Measured at full width on 2 CPU cores (docs/performance.md, serve): a prompt
# token costs about an eighth of a batch-1 decode step, so a full chunk delays the running rows by ~16 steps.
MAX_PREFILL_TOKENS = 128

# Views of one image per vision-tower call (XComposer2ForCausalLM.vision_group): the tower's activations are
# those of one group whatever hd_num (hd_num 24, 25 CLIP-L/560 views, fp32, 2 tower layers: 13.3 GB above the
# model at once, 2.05 GB in groups of 4; 4.97 GB in groups of 4 with all 24 layers; docs/performance.md,
# vision_memory), and the last group of an image is smaller (the
# view count is a dynamic dimension: one compiled graph).
VISION_GROUP = 4


@dataclass
class LLMConfig:
    """InternLM2 language model."""

    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    intermediate_size: int = 14336
    vocab_size: int = 92544
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    rope_scaling: Optional[Dict[str, object]] = None  # {"type": "dynamic"|"linear", "factor": f}
    max_position_embeddings: int = 32768
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def qkv_out(self) -> int:
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim


@dataclass
class VisionConfig:
    """CLIP ViT vision tower (as `transformers.CLIPVisionConfig`)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 336
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid * self.grid + 1


# The InternLM2 linears PLoRA can wrap (attention: wqkv, wo; feed-forward: w1, w2, w3).
PLORA_LINEARS = ("wqkv", "wo", "w1", "w2", "w3")


@dataclass
class PLoRAConfig:
    """Rank and alpha of one PLoRA linear; the low-rank update is scaled by alpha / rank (rank 0: none)."""

    rank: int
    alpha: int

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


NO_PLORA = PLoRAConfig(0, 0)


def llm_config_from_hf(hf_config: Mapping[str, object], vocab_rows: int, hidden: int) -> LLMConfig:
    """The decoder's `LLMConfig` from HF config.json fields (InternLM2 / LLaMA names), with the embedding shape
    (vocab_rows, hidden) from the checkpoint: the vocabulary size is the table's, and a config.json
    hidden_size that contradicts the table is refused."""
    llm = LLMConfig(
        hidden_size=int(hf_config.get("hidden_size", hidden)),
        num_hidden_layers=int(hf_config["num_hidden_layers"]),
        num_attention_heads=int(hf_config["num_attention_heads"]),
        num_key_value_heads=int(hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"]),
        intermediate_size=int(hf_config["intermediate_size"]),
        vocab_size=int(vocab_rows),
        rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-5)),
        rope_theta=float(hf_config.get("rope_theta", 10000.0)),
        rope_scaling=rope_scaling_from_hf(hf_config.get("rope_scaling")),
        max_position_embeddings=int(hf_config.get("max_position_embeddings", 2048)),
        bos_token_id=int(hf_config.get("bos_token_id", 1)),
        eos_token_id=first_id(hf_config.get("eos_token_id", 2)),
        pad_token_id=int(hf_config.get("pad_token_id", 2) or 0),
    )
    if llm.hidden_size != hidden:
        raise ConfigError(f"config.json hidden_size {llm.hidden_size} but the token embedding has width {hidden}")
    return llm


def rope_scaling_from_hf(value: object) -> Optional[Dict[str, object]]:
    """The `rope_scaling` of an HF config.json ({"type", "factor"}; dynamic or linear), or None; ConfigError else."""
    if not value:
        return None
    if not isinstance(value, Mapping) or value.get("type") not in ("dynamic", "linear"):
        raise ConfigError(f"rope_scaling {value!r} not supported: expected type 'dynamic' or 'linear'")
    return {"type": value["type"], "factor": float(value["factor"])}


def first_id(value: object) -> int:
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


