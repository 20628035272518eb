"""InternVL-1.5 configuration, read from the HF `config.json` of an `InternVLChatModel` checkpoint.

The HF file describes everything (unlike XComposer2's): `vision_config` (InternViT), `llm_config`
(InternLM2) and the chat-model fields. A field missing from the file gets the default of the official config
class (`InternVLChatConfig`, `InternVisionConfig`, `InternLM2Config` at v1.5.1), because that is what the
official code silently does; several of those defaults differ from the V1.5 values (select_layer -4,
ps_version v1, use_thumbnail False, vision image_size 224, LLM bias True, rope_theta 10000, ...).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional

from ms_xcomposer.config import ConfigError, LLMConfig, rope_scaling_from_hf
from .prompt import TEMPLATES

ARCHITECTURE = "InternVLChatModel"
LLM_ARCHITECTURES = ("InternLM2ForCausalLM",)  # the official code also builds Llama/Phi3 LLMs: not ported
NORM_TYPES = ("rms_norm", "layer_norm")
PS_VERSIONS = ("v1", "v2")


@dataclass
class InternViTConfig:
    """InternViT (`InternVisionConfig`); defaults are the official class defaults (the 6B flavour)."""

    hidden_size: int = 3200
    num_hidden_layers: int = 48
    num_attention_heads: int = 25
    intermediate_size: int = 12800
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6  # norm1/norm2 and q_norm/k_norm
    norm_type: str = "rms_norm"  # "rms_norm" (6B) or "layer_norm" (300M)
    qk_normalization: bool = True  # RMSNorm of q and k over all heads jointly
    qkv_bias: bool = False
    hidden_act: str = "gelu"

    def __post_init__(self) -> None:
        if self.norm_type not in NORM_TYPES:
            raise ConfigError(f"vision norm_type {self.norm_type!r} not supported: expected one of {NORM_TYPES}")
        if self.hidden_act != "gelu":
            raise ConfigError(f"vision hidden_act {self.hidden_act!r} not supported: expected 'gelu'")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision hidden_size {self.hidden_size} is not a multiple of "
                              f"num_attention_heads {self.num_attention_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid(self) -> int:
        """Side of the stored position grid (image_size // patch_size)."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid * self.grid + 1


# Official `InternVLChatConfig` / `InternLM2Config` defaults, applied to missing fields.
_CHAT_DEFAULTS: Dict[str, object] = {
    "select_layer": -4, "ps_version": "v1", "downsample_ratio": 0.5, "template": None, "force_image_size": None,
    "dynamic_image_size": False, "use_thumbnail": False, "min_dynamic_patch": 1, "max_dynamic_patch": 6,
    "pad2square": False,
}
_LLM_DEFAULTS: Dict[str, object] = {
    "vocab_size": 103168, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "bias": True, "rope_theta": 10000,
    "rope_scaling": None, "tie_word_embeddings": False,
}


@dataclass
class InternVLConfig:
    """The whole InternVL-1.5 chat model: InternViT, InternLM2 and how images become LLM tokens."""

    vision: InternViTConfig = field(default_factory=InternViTConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    select_layer: int = -1  # ViT hidden state fed to the projector: -1 = last layer, -4 = 3 layers earlier
    ps_version: str = "v2"  # pixel shuffle: "v2", or "v1" (the 16x16 token grid stays transposed)
    downsample_ratio: float = 0.5
    template: str = "internlm2-chat"
    force_image_size: Optional[int] = 448  # tile side; None = the vision image_size
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    pad2square: bool = False

    def __post_init__(self) -> None:
        if self.ps_version not in PS_VERSIONS:
            raise ConfigError(f"ps_version {self.ps_version!r} not supported: expected one of {PS_VERSIONS}")
        if self.template not in TEMPLATES:
            raise ConfigError(f"template {self.template!r} not supported: expected one of {sorted(TEMPLATES)}")
        if self.downsample_ratio != 0.5:
            # the official pixel shuffle and mlp1 width assume 1/ratio is an integer; every release uses 0.5
            raise ConfigError(f"downsample_ratio {self.downsample_ratio} not supported: expected 0.5")
        n = self.vision.num_hidden_layers
        if not -(n + 1) <= self.select_layer <= n:
            raise ConfigError(f"select_layer {self.select_layer} out of range for {n} vision layers "
                              f"(hidden states are -{n + 1}..{n})")
        if self.pad2square:
            raise ConfigError("pad2square true not supported: the V1.5 transform does not pad")
        if not 1 <= self.min_dynamic_patch <= self.max_dynamic_patch:
            raise ConfigError(f"min_dynamic_patch {self.min_dynamic_patch} / max_dynamic_patch "
                              f"{self.max_dynamic_patch}: expected 1 <= min <= max")

    @property
    def image_size(self) -> int:
        """Side of one ViT input tile (force_image_size, else the vision image_size), as the official code."""
        return self.force_image_size or self.vision.image_size

    @property
    def num_image_token(self) -> int:
        """LLM tokens per tile: (image_size // patch)^2 * downsample_ratio^2 (256 for 448 tiles)."""
        return int((self.image_size // self.vision.patch_size) ** 2 * self.downsample_ratio ** 2)

    @property
    def projector_in(self) -> int:
        """Width entering `mlp1`: the ViT width times (1 / downsample_ratio)^2."""
        return self.vision.hidden_size * int(1 / self.downsample_ratio) ** 2

    @property
    def vision_layers_used(self) -> int:
        """How many ViT layers produce hidden state `select_layer` (hidden state k = output of k layers)."""
        n = self.vision.num_hidden_layers
        return self.select_layer % (n + 1)

    # ---- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> "InternVLConfig":
        d = dict(d)
        return cls(vision=InternViTConfig(**d.pop("vision")), llm=LLMConfig(**d.pop("llm")), **d)

    # ---- the HF config.json ------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_config: Mapping[str, object], source: str = "config.json") -> "InternVLConfig":
        """Build the config from the dict of an HF `InternVLChatModel` config.json; `source` names it in errors.

        Raises ConfigError naming the file and the field for anything missing, malformed or unsupported.
        """
        arch = hf_config.get("architectures") or []
        if ARCHITECTURE not in arch:
            raise ConfigError(f"{source}: architectures {arch!r} do not include {ARCHITECTURE!r}")
        vision_d = _section(hf_config, "vision_config", source)
        llm_d = _section(hf_config, "llm_config", source)

        def get(d: Mapping[str, object], name: str, kind, default, where: str):
            value = d.get(name, default)
            if value is None:
                return None
            try:
                return _convert(value, kind)
            except (TypeError, ValueError):
                raise ConfigError(f"{source}: {where}{name} = {value!r} is not a valid {kind.__name__}") from None

        vision_kwargs = {f.name: get(vision_d, f.name, type(f.default), f.default, "vision_config.")
                         for f in dataclasses.fields(InternViTConfig)}
        try:
            vision = InternViTConfig(**vision_kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: vision_config: {e}") from None
        llm = _llm_config(llm_d, source, get)
        chat = {name: get(hf_config, name, _CHAT_TYPES[name], default, "")
                for name, default in _CHAT_DEFAULTS.items()}
        if chat["template"] is None:
            raise ConfigError(f"{source}: no 'template' (the conversation template name, e.g. 'internlm2-chat')")
        try:
            return cls(vision=vision, llm=llm, **chat)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_checkpoint(cls, hf_config: Mapping[str, object], shapes: Mapping[str, object] = None,
                        source: str = "config.json") -> "InternVLConfig":
        """`Family.config_from_hf`: the HF config.json alone describes the model (the shapes are checked against
        the Cells by the converter's plan, not needed here)."""
        return cls.from_hf(hf_config, source)

    @classmethod
    def from_section(cls, section: Mapping[str, object], path: str = "config.json") -> "InternVLConfig":
        """The config the converter stored (the "ms_xcomposer" section of a converted config.json);
        ConfigError naming `path` when a field is missing or invalid."""
        try:
            return cls.from_dict({k: v for k, v in section.items() if k != "family"})
        except ConfigError as e:
            raise ConfigError(f"{path}: 'ms_xcomposer' section: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path}: malformed 'ms_xcomposer' section: {type(e).__name__}: {e}") from None

    @classmethod
    def from_file(cls, path: str) -> "InternVLConfig":
        """Read an HF config.json (a file, or a directory holding one)."""
        from ms_xcomposer.conversion.readers import read_json

        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        return cls.from_hf(read_json(path, "config", ConfigError), path)


_CHAT_TYPES = {"select_layer": int, "ps_version": str, "downsample_ratio": float, "template": str,
               "force_image_size": int, "dynamic_image_size": bool, "use_thumbnail": bool,
               "min_dynamic_patch": int, "max_dynamic_patch": int, "pad2square": bool}


def _section(d: Mapping[str, object], name: str, source: str) -> Mapping[str, object]:
    value = d.get(name)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: no '{name}' object")
    return value


def _convert(value: object, kind: type) -> object:
    """`value` as `kind` (int, float, str or bool) without lossy conversions; ValueError otherwise."""
    if kind is bool:
        if isinstance(value, bool) or value in (0, 1):  # JSON true/false, or 0/1 flags
            return bool(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str and isinstance(value, str):
        return value
    raise ValueError(value)


def _llm_config(d: Mapping[str, object], source: str, get) -> LLMConfig:
    """The InternLM2 part as the shared decoder's `LLMConfig`; refuses what that decoder does not build."""
    arch = (d.get("architectures") or [None])[0]
    if arch not in LLM_ARCHITECTURES:
        raise ConfigError(f"{source}: llm_config.architectures[0] = {arch!r} not supported: expected one of "
                          f"{LLM_ARCHITECTURES}")

    def value(name: str, kind):
        return get(d, name, kind, _LLM_DEFAULTS.get(name), "llm_config.")

    if value("bias", bool):
        raise ConfigError(f"{source}: llm_config.bias is true (or missing: InternLM2Config defaults to true); "
                          "only bias-free InternLM2 linears are supported")
    if value("hidden_act", str) != "silu":
        raise ConfigError(f"{source}: llm_config.hidden_act {d.get('hidden_act')!r} not supported: expected 'silu'")
    if value("tie_word_embeddings", bool):
        raise ConfigError(f"{source}: llm_config.tie_word_embeddings true not supported: InternLM2 has its own "
                          "`output` head")
    heads = value("num_attention_heads", int)
    kv_heads = get(d, "num_key_value_heads", int, heads, "llm_config.")
    hidden = value("hidden_size", int)
    if hidden % heads or heads % kv_heads:
        raise ConfigError(f"{source}: llm_config hidden_size {hidden}, num_attention_heads {heads}, "
                          f"num_key_value_heads {kv_heads}: expected hidden % heads == 0 and heads % kv_heads == 0")
    eos = d.get("eos_token_id", _LLM_DEFAULTS["eos_token_id"])
    try:
        return LLMConfig(
            hidden_size=hidden,
            num_hidden_layers=value("num_hidden_layers", int),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            intermediate_size=value("intermediate_size", int),
            vocab_size=value("vocab_size", int),
            rms_norm_eps=value("rms_norm_eps", float),
            rope_theta=value("rope_theta", float),
            rope_scaling=rope_scaling_from_hf(d.get("rope_scaling")),
            max_position_embeddings=value("max_position_embeddings", int),
            bos_token_id=value("bos_token_id", int),
            eos_token_id=_convert(eos[0] if isinstance(eos, list) else eos, int),
            pad_token_id=value("pad_token_id", int) or 0,  # null pad id: the class default 0
        )
    except (ConfigError, ValueError) as e:
        raise ConfigError(f"{source}: llm_config: {e}") from None


__all__ = ["InternViTConfig", "InternVLConfig", "ConfigError"]
