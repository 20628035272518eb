"""`LlavaConfig` from an llava-hf `config.json`, and the two key layouts of llava-hf checkpoints.

Pure Python (no MindSpore). Fields missing from config.json take transformers' defaults, as
`transformers.LlavaConfig` fills them: the released llava-1.5-7b-hf `text_config` names only a few fields
(max_position_embeddings, rms_norm_eps, vocab_size, ...), the rest are `LlamaConfig` defaults (hidden 4096,
32 layers, 32 heads, intermediate 11008, RoPE theta 10000); a missing `vision_config` is LLaVA's CLIP ViT-L/14-336.

Tied output head: transformers ties `lm_head` to the input embedding when the *text* config's
`tie_word_embeddings` is true (`PreTrainedModel.get_text_config(decoder=True)`; LlamaConfig's default is false);
the top-level flag, true by default in `PretrainedConfig`, is not what decides.

Key layouts (`detect_layout`, `to_published`, `from_published`): the published one, which `save_pretrained`
still writes (`vision_tower.vision_model.*`, `multi_modal_projector.linear_{1,2}.*`, `language_model.model.*`,
`language_model.lm_head.*`), and the module tree of transformers >= 4.52 (`model.vision_tower.*`,
`model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.*`) that checkpoints re-saved from a state
dict carry. The MindSpore names are the published ones, so exporting back to the published layout is identity.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

from ms_xcomposer.config import ConfigError, LLMConfig, VisionConfig, llm_config_from_hf

# transformers' defaults (LlamaConfig; CLIPVisionConfig as LlavaConfig builds it when vision_config is absent).
LLAMA_DEFAULTS: Dict[str, object] = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1,
    eos_token_id=2, pad_token_id=None, tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=None,
    attention_bias=False, mlp_bias=False, head_dim=None,
)
CLIP_VISION_DEFAULTS: Dict[str, object] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
    patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3,
)
LLAVA_VISION_DEFAULTS: Dict[str, object] = dict(
    CLIP_VISION_DEFAULTS, intermediate_size=4096, hidden_size=1024, patch_size=14, image_size=336,
    num_hidden_layers=24, num_attention_heads=16,
)
SELECT_STRATEGIES = ("default", "full")  # "default" drops the class token of the vision features, "full" keeps it
PROJECTOR_ACTS = ("gelu",)  # exact (erf) GELU, transformers' ACT2FN["gelu"]

PUBLISHED, MODULES = "published", "modules"
EMBED_TOKENS = "language_model.model.embed_tokens.weight"  # published name
# (modules-layout prefix, published prefix), most specific first: each name is renamed by its first match.
LAYOUT_PREFIXES: Tuple[Tuple[str, str], ...] = (
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


@dataclass
class LlavaConfig:
    """LLaVA: a CLIP tower, a 2-layer projector (linear_1, act, linear_2) and a LLaMA decoder.

    vision_feature_layer indexes the tower's hidden states as transformers does (0 = the embeddings after
    `pre_layrnorm`, i = the output of encoder layer i - 1, negative from the end: -1 the last layer, -2 the one
    before). `image_tokens` is how many positions one image fills in the prompt.
    """

    vision: VisionConfig
    llm: LLMConfig
    image_token_index: int = 32000
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: Optional[int] = None

    def __post_init__(self) -> None:
        where = "LlavaConfig"
        if self.vision_feature_select_strategy not in SELECT_STRATEGIES:
            raise ConfigError(f"{where}: vision_feature_select_strategy {self.vision_feature_select_strategy!r} "
                              f"not supported; expected one of {list(SELECT_STRATEGIES)}")
        if self.projector_hidden_act not in PROJECTOR_ACTS:
            raise ConfigError(f"{where}: projector_hidden_act {self.projector_hidden_act!r} not supported; expected "
                              f"one of {list(PROJECTOR_ACTS)}")
        layers = self.vision.num_hidden_layers
        if isinstance(self.vision_feature_layer, bool) or not isinstance(self.vision_feature_layer, int) \
                or not -(layers + 1) <= self.vision_feature_layer <= layers:
            raise ConfigError(f"{where}: vision_feature_layer {self.vision_feature_layer!r} must be one integer in "
                              f"{-(layers + 1)}..{layers} (the tower has {layers} layers; lists of layers are not "
                              "supported)")

    @property
    def vision_hidden_index(self) -> int:
        """The non-negative index into the tower's hidden states (= how many encoder layers must run)."""
        return self.vision_feature_layer % (self.vision.num_hidden_layers + 1)

    @property
    def image_tokens(self) -> int:
        """Positions one image fills: (image_size / patch_size)^2, plus the class token under "full"."""
        return self.vision.grid * self.vision.grid + (self.vision_feature_select_strategy == "full")

    # ---- (de)serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> "LlavaConfig":
        d = dict(d)
        return cls(vision=VisionConfig(**d.pop("vision")), llm=LLMConfig(**d.pop("llm")), **d)

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, object], where: str = "config.json",
                embedding: Optional[Tuple[int, int]] = None) -> "LlavaConfig":
        """From an llava-hf config.json dict; `where` names it in errors (e.g. the file's path). `embedding`: the
        checkpoint's token-embedding shape (rows, width): the vocabulary is the table's, and a hidden_size that
        contradicts it is refused (default: text_config's vocab_size and hidden_size)."""
        if not isinstance(hf_config, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, found {type(hf_config).__name__}")
        text = _section(hf_config, "text_config", where)
        vision = _section(hf_config, "vision_config", where)
        if text.get("model_type", "llama") != "llama":
            raise ConfigError(f"{where}: text_config.model_type {text['model_type']!r} not supported; expected 'llama'")
        if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ConfigError(f"{where}: vision_config.model_type {vision['model_type']!r} not supported; expected "
                              "'clip_vision_model'")
        text = {**LLAMA_DEFAULTS, **text}
        vision = {**(LLAVA_VISION_DEFAULTS if hf_config.get("vision_config") is None else CLIP_VISION_DEFAULTS),
                  **vision}
        for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if text[key] != want:
                raise ConfigError(f"{where}: text_config.{key} {text[key]!r} not supported; expected {want!r}")
        for key, want in (("hidden_act", "quick_gelu"), ("num_channels", 3)):
            if vision[key] != want:
                raise ConfigError(f"{where}: vision_config.{key} {vision[key]!r} not supported; expected {want!r}")
        scaling = text["rope_scaling"]
        if isinstance(scaling, Mapping) and "type" not in scaling and "rope_type" in scaling:
            text["rope_scaling"] = {"type": scaling["rope_type"], **scaling}  # transformers >= 4.45 writes rope_type
        try:
            rows, width = (int(text["vocab_size"]), int(text["hidden_size"])) if embedding is None else embedding
            llm = llm_config_from_hf(text, rows, width)
            if text["head_dim"] is not None and int(text["head_dim"]) != llm.head_dim:
                raise ConfigError(f"text_config.head_dim {text['head_dim']} is not hidden_size / num_attention_heads "
                                  f"= {llm.head_dim}")
            if llm.num_attention_heads % llm.num_key_value_heads:
                raise ConfigError(f"text_config.num_attention_heads {llm.num_attention_heads} is not a multiple of "
                                  f"num_key_value_heads {llm.num_key_value_heads}")
            vis = VisionConfig(**{f.name: type(f.default)(vision[f.name]) for f in dataclasses.fields(VisionConfig)})
            return cls(
                vision=vis, llm=llm,
                image_token_index=int(hf_config.get("image_token_index", 32000)),
                vision_feature_layer=hf_config.get("vision_feature_layer", -2),
                vision_feature_select_strategy=hf_config.get("vision_feature_select_strategy", "default"),
                projector_hidden_act=hf_config.get("projector_hidden_act", "gelu"),
                projector_bias=bool(hf_config.get("multimodal_projector_bias", True)),
                tie_word_embeddings=bool(text["tie_word_embeddings"]),
                pad_token_id=_optional_int(hf_config.get("pad_token_id")),
            )
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: a field has the wrong type or value ({type(e).__name__}: {e})") from None

    @classmethod
    def from_checkpoint(cls, hf_config: Mapping[str, object], shapes: Mapping[str, Sequence[int]],
                        where: str = "config.json") -> "LlavaConfig":
        """The family's `config_from_hf`: config.json fields and the checkpoint's {name: shape}. ConfigError when
        the names mix the two key layouts or have no token embedding."""
        layout = detect_layout(shapes)
        embed = from_published(EMBED_TOKENS, layout)
        if embed not in shapes:
            raise ConfigError(f"checkpoint has no tensor {embed!r}, needed to read the vocabulary size")
        rows, width = (int(d) for d in shapes[embed])
        return cls.from_hf(hf_config, where, (rows, width))

    @classmethod
    def from_section(cls, section: Mapping[str, object], path: str = "config.json") -> "LlavaConfig":
        """The config the converter stored (the "ms_xcomposer" section of a converted config.json)."""
        try:
            return cls.from_dict({k: v for k, v in section.items() if k != "family"})
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path}: malformed 'ms_xcomposer' section: {type(e).__name__}: {e}") from None

    @classmethod
    def from_file(cls, path: str) -> "LlavaConfig":
        """From `path` (a config.json, or a directory holding one). ConfigError names the file when it is missing,
        not JSON or not an object (`readers.read_json`), and the file and field when a field is unsupported."""
        from ms_xcomposer.conversion.readers import read_json

        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        return cls.from_hf(read_json(path, "config", ConfigError), where=path)


def _section(hf_config: Mapping[str, object], key: str, where: str) -> Dict[str, object]:
    value = hf_config.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: {key} should be a JSON object, found {type(value).__name__}")
    return dict(value)


def _optional_int(value: object) -> Optional[int]:
    return None if value is None else int(value)


# ---- key layouts ---------------------------------------------------------------------------------------
def detect_layout(names: Iterable[str]) -> str:
    """PUBLISHED ("published") or MODULES ("modules") for a checkpoint's tensor names; ConfigError when the names
    mix the two layouts or are neither."""
    names = list(names)
    published = [n for n in names if any(n.startswith(p) for _, p in LAYOUT_PREFIXES)]
    modules = [n for n in names if any(n.startswith(m) for m, _ in LAYOUT_PREFIXES)]
    if published and modules:
        raise ConfigError(f"checkpoint mixes the two llava-hf key layouts, e.g. {published[0]!r} (published) and "
                          f"{modules[0]!r} (transformers >= 4.52 modules)")
    if published:
        return PUBLISHED
    if modules:
        return MODULES
    sample = ", ".join(repr(n) for n in names[:3]) or "no tensors"
    raise ConfigError(f"not an llava-hf checkpoint: no name starts with language_model. / vision_tower. / "
                      f"multi_modal_projector. or model.language_model. / lm_head. (found {sample})")


def to_published(name: str, layout: str) -> str:
    """The published (= MindSpore) name of tensor `name` of a checkpoint in `layout`."""
    if layout == PUBLISHED:
        return name
    _check_layout(layout)
    for modules, published in LAYOUT_PREFIXES:
        if name.startswith(modules):
            return published + name[len(modules):]
    raise ConfigError(f"tensor {name!r} is not in the {layout} llava-hf layout")


def from_published(name: str, layout: str) -> str:
    """The name in `layout` of the published (= MindSpore) name `name`: the inverse of `to_published`."""
    if layout == PUBLISHED:
        return name
    _check_layout(layout)
    for modules, published in LAYOUT_PREFIXES:
        if name.startswith(published):
            return modules + name[len(published):]
    raise ConfigError(f"{name!r} is not a published llava-hf tensor name")


def _check_layout(layout: str) -> None:
    if layout not in (PUBLISHED, MODULES):
        raise ConfigError(f"unknown llava-hf key layout {layout!r}; expected {PUBLISHED!r} or {MODULES!r}")
