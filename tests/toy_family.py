"""A toy model family, defined entirely in the tests: the "how to add a family" checklist of
docs/architecture.md, followed step by step (registered through `MS_XCOMPOSER_FAMILIES=toy_family`).

ToyLM is a text-only decoder: the shared InternLM2 decoder with PLoRA off, an output head the HF checkpoint
calls `lm_head` (renamed to `output` by the key table: the one name that differs), a plain "User: / Assistant:"
prompt, and the golden case's InternLM2 tokenizer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence

from ms_xcomposer.config import ConfigError, LLMConfig, llm_config_from_hf
from ms_xcomposer.conversion.keymap import DROP, KeyTable, Rule, same
from ms_xcomposer.families import Family

ARCHITECTURE = "ToyLMForCausalLM"


# 1. the config: from HF config.json + shapes, and back and forth to the converter's stored section.
@dataclass
class ToyConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)

    def to_dict(self) -> Dict[str, object]:
        return {"llm": dataclasses.asdict(self.llm)}

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, object], shapes: Mapping[str, Sequence[int]]) -> "ToyConfig":
        if "model.tok_embeddings.weight" not in shapes:
            raise ConfigError("toy checkpoint has no model.tok_embeddings.weight")
        rows, hidden = shapes["model.tok_embeddings.weight"]
        return cls(llm_config_from_hf(hf_config, rows, hidden))

    @classmethod
    def from_section(cls, section: Mapping[str, object], path: str = "config.json") -> "ToyConfig":
        return cls(LLMConfig(**section["llm"]))


# 2. the key table: only what differs from the Cells' names, plus what is not a weight.
KEYS = KeyTable((
    same("model.tok_embeddings.weight"),
    same("model.norm.weight"),
    same("model.layers.{n}.{attention_norm|ffn_norm}.weight"),
    same("model.layers.{n}.attention.{wqkv|wo}.weight"),
    same("model.layers.{n}.feed_forward.{w1|w2|w3}.weight"),
    Rule("lm_head.weight", "output.weight"),
    same("model.layers.{n}.attention.rotary_emb.inv_freq", DROP, "RoPE buffer; not a weight"),
))

# 3. the family, registered by the registry when this module is named in MS_XCOMPOSER_FAMILIES.
FAMILY = Family(
    name="toy",
    architectures=(ARCHITECTURE,),
    config_from_hf=ToyConfig.from_hf,
    config_from_section=ToyConfig.from_section,
    model="toy_modeling:ToyForCausalLM",
    processor="toy_modeling:ToyProcessor",
    keys=KEYS,
    description="a text-only toy family defined in the tests",
)


def hf_config(llm: LLMConfig) -> Dict[str, object]:
    """The config.json of a toy HF checkpoint."""
    return {"architectures": [ARCHITECTURE], **{k: v for k, v in dataclasses.asdict(llm).items()
                                                  if k not in ("vocab_size",)}, "vocab_size": llm.vocab_size}


def tiny_llm(vocab: int = 1000) -> LLMConfig:
    return LLMConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128, vocab_size=vocab, rope_theta=10000.0, max_position_embeddings=512)


def config_of(llm: Optional[LLMConfig] = None) -> ToyConfig:
    return ToyConfig(llm or tiny_llm())
