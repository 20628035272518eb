"""The XComposer2 family's config: LLM + CLIP tower + projector + PLoRA per linear + variant, and the facts that
tell the variants apart (`VariantSpec`).

The real Hugging Face `config.json` files describe only the language model; the vision tower, projector,
PLoRA ranks and the variant are inferred from the checkpoint's tensor shapes (`XComposerConfig.from_hf`).
A converted directory stores the complete config (`to_dict` / `from_dict`), so loading needs no inference.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence, Tuple

from ms_xcomposer.config import PLORA_LINEARS, ConfigError, LLMConfig, PLoRAConfig, VisionConfig, llm_config_from_hf

TASK_ADAPTERS = ("web", "sft", "dpo")
# The IXC-2.5 inference modes and the task adapters each adds at every position; "base" adds none.
INFER_MODES: Dict[str, Tuple[str, ...]] = {"base": (), "web": ("web",), "write": ("sft", "dpo")}
VIT_PREFIX = "vit.vision_tower.vision_model."

DEFAULT_META_INSTRUCTION = (
    "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n"
    "- InternLM-XComposer (浦语·灵笔) is a multi-modality conversational language model that is developed by "
    "Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by the "
    "user such as English and 中文.\n"
    "- InternLM-XComposer (浦语·灵笔) is capable of comprehending and articulating responses effectively based "
    "on the provided image."
)


@dataclass(frozen=True)
class VariantSpec:
    """Everything that differs between IXC2-VL, IXC2-4KHD and IXC-2.5 outside the weights' shapes.

    Cells and prompt builders read these fields instead of testing the variant's name.
    """

    name: str
    image_transform: str  # "resize" (VL: one square image), "hd_centre" (4KHD), "hd_bottom" (2.5)
    tile_size: int  # side of one ViT input: 490 (VL), 336 (4KHD), 560 (2.5)
    accepts_video: bool  # videos become one canvas image (2.5)
    hd_tiles: bool  # global view + tiles, 2x2 patch merge, separators
    meta_always: bool  # the system prompt is always sent (VL, 4KHD) or only with use_meta (2.5)
    bos_every_piece: bool  # BOS on every text piece around images (VL, 4KHD) or only the first (2.5)
    auto_image_placeholder: bool  # a single image with no <ImageHere> goes first (2.5)
    multi_image_hd_num: Optional[int]  # hd_num forced when several images are given (2.5: 6)
    default_hd_num: int
    # PLoRA (rank, alpha) of the released checkpoint per linear; alpha is not recoverable from shapes.
    plora_alpha: Tuple[Tuple[str, int, int], ...]


VARIANTS: Dict[str, VariantSpec] = {
    "ixc2-vl": VariantSpec(
        name="ixc2-vl", image_transform="resize", tile_size=490, accepts_video=False,
        hd_tiles=False, meta_always=True, bos_every_piece=True,
        auto_image_placeholder=False, multi_image_hd_num=None, default_hd_num=1,
        plora_alpha=tuple((n, 256, 256) for n in PLORA_LINEARS),
    ),
    "ixc2-4khd": VariantSpec(
        name="ixc2-4khd", image_transform="hd_centre", tile_size=336, accepts_video=False,
        hd_tiles=True, meta_always=True, bos_every_piece=True,
        auto_image_placeholder=False, multi_image_hd_num=None, default_hd_num=25,
        plora_alpha=(("wqkv", 8, 16),) + tuple((n, 256, 256) for n in PLORA_LINEARS[1:]),
    ),
    "ixc2.5": VariantSpec(
        name="ixc2.5", image_transform="hd_bottom", tile_size=560, accepts_video=True,
        hd_tiles=True, meta_always=False, bos_every_piece=False,
        auto_image_placeholder=True, multi_image_hd_num=6, default_hd_num=24,
        plora_alpha=tuple((n, 256, 256) for n in PLORA_LINEARS),
    ),
}


def variant_spec(variant: "str | VariantSpec") -> VariantSpec:
    """The `VariantSpec` of a variant name ("ixc2-vl", "ixc2-4khd", "ixc2.5"), or the spec itself."""
    if isinstance(variant, VariantSpec):
        return variant
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    return VARIANTS[variant]


@dataclass
class XComposerConfig:
    """The whole model: LLM, vision tower, projector, PLoRA per linear, variant, task adapters."""

    variant: str = "ixc2.5"
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    proj_hidden: int = 4096
    plora: Dict[str, PLoRAConfig] = field(default_factory=dict)
    task_adapters: Tuple[str, ...] = ()  # 2.5's lora_{web,sft,dpo}, when the checkpoint carries them
    task_adapter_rank: int = 256
    has_post_layernorm: bool = True

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown variant {self.variant!r}; expected one of {sorted(VARIANTS)}")
        if not self.plora:
            self.plora = {n: PLoRAConfig(r, a) for n, r, a in VARIANTS[self.variant].plora_alpha}
        llm = self.llm
        if llm.hidden_size % llm.num_attention_heads:
            raise ConfigError(f"hidden_size {llm.hidden_size} is not a multiple of heads {llm.num_attention_heads}")
        if llm.num_attention_heads % llm.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {llm.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {llm.num_key_value_heads}"
            )

    @property
    def spec(self) -> VariantSpec:
        return VARIANTS[self.variant]

    @property
    def proj_in(self) -> int:
        """Width entering `vision_proj`: 4x the ViT width after the HD variants' 2x2 patch merge."""
        return self.vision.hidden_size * (4 if self.spec.hd_tiles else 1)

    @property
    def tile_size(self) -> int:
        """Side of one ViT input: the tower's image_size (the variant's `tile_size` in released checkpoints;
        tests build smaller towers)."""
        return self.vision.image_size

    def image_tokens(self, grid_h: int = 1, grid_w: int = 1) -> int:
        """Number of embedding rows one image becomes, for an HD grid of grid_h x grid_w tiles."""
        g = self.vision.grid
        if not self.spec.hd_tiles:
            return g * g
        m = g // 2
        return (grid_h * grid_w + 1) * m * m + 1 + (grid_h + 1) * m

    # ---- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, object]:
        d = dataclasses.asdict(self)
        d["task_adapters"] = list(self.task_adapters)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> "XComposerConfig":
        d = dict(d)
        return cls(
            variant=d["variant"],
            llm=LLMConfig(**d["llm"]),
            vision=VisionConfig(**d["vision"]),
            proj_hidden=d["proj_hidden"],
            plora={k: PLoRAConfig(**v) for k, v in d["plora"].items()},
            task_adapters=tuple(d.get("task_adapters", ())),
            task_adapter_rank=d.get("task_adapter_rank", 256),
            has_post_layernorm=d.get("has_post_layernorm", True),
        )

    # ---- inference from an HF checkpoint -----------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_config: Mapping[str, object], shapes: Mapping[str, Sequence[int]],
                variant: Optional[str] = None) -> "XComposerConfig":
        """Build the config from an HF `config.json` dict and the checkpoint's {key: shape}.

        The vision tower, projector, PLoRA ranks and the variant come from the shapes, since the real
        config.json does not describe them. `variant` overrides the inferred variant.
        """
        def shape(key: str) -> Tuple[int, ...]:
            if key not in shapes:
                raise ConfigError(f"checkpoint has no tensor {key!r}, needed to infer the model config")
            return tuple(int(s) for s in shapes[key])

        vocab_rows, hidden = shape("model.tok_embeddings.weight")
        llm = llm_config_from_hf(hf_config, vocab_rows, hidden)
        layer_ids = {int(m.group(1)) for k in shapes if (m := re.match(r"model\.layers\.(\d+)\.", k))}
        if layer_ids and max(layer_ids) + 1 != llm.num_hidden_layers:
            raise ConfigError(
                f"config.json num_hidden_layers {llm.num_hidden_layers} but checkpoint has "
                f"{max(layer_ids) + 1} decoder layers"
            )

        vision = infer_vision_config(shapes)
        has_gn = "plora_glb_GN" in shapes
        task_adapters = tuple(t for t in TASK_ADAPTERS if f"model.layers.0.attention.wqkv.lora_{t}_A.weight" in shapes)
        if variant is None:
            if not has_gn:
                variant = "ixc2-vl"
            elif task_adapters or vision.image_size == 560:
                variant = "ixc2.5"
            else:
                variant = "ixc2-4khd"
        spec = VARIANTS.get(variant)
        if spec is None:
            raise ConfigError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
        if spec.hd_tiles != has_gn:
            raise ConfigError(f"variant {variant} {'needs' if spec.hd_tiles else 'has no'} plora_glb_GN/plora_sub_GN")

        known_alpha = {n: (r, a) for n, r, a in spec.plora_alpha}
        plora = {}
        for name in PLORA_LINEARS:
            group = "attention" if name in ("wqkv", "wo") else "feed_forward"
            rank = shape(f"model.layers.0.{group}.{name}.Plora_A.weight")[0]
            r0, a0 = known_alpha[name]
            # alpha is not stored; the released ratio alpha/r is kept for the known rank, otherwise scale 1.
            plora[name] = PLoRAConfig(rank, a0 if rank == r0 else rank)
        proj_in, _ = shape("vision_proj.0.weight")[::-1]
        proj_hidden = shape("vision_proj.0.weight")[0]
        cfg = cls(
            variant=variant, llm=llm, vision=vision, proj_hidden=proj_hidden, plora=plora,
            task_adapters=task_adapters,
            task_adapter_rank=(shape("model.layers.0.attention.wqkv.lora_web_A.weight")[0]
                               if "web" in task_adapters else 256),
            has_post_layernorm=VIT_PREFIX + "post_layernorm.weight" in shapes,
        )
        if cfg.proj_in != proj_in:
            raise ConfigError(f"vision_proj.0 takes {proj_in} features but variant {variant} gives {cfg.proj_in}")
        return cfg

    @classmethod
    def from_section(cls, section: Mapping[str, object], path: str = "config.json") -> "XComposerConfig":
        """The config stored by the converter (the "ms_xcomposer" section of a converted config.json);
        ConfigError naming `path` when a field is missing or invalid."""
        try:
            return cls.from_dict({k: v for k, v in section.items() if k != "family"})
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path}: malformed 'ms_xcomposer' section: {type(e).__name__}: {e}") from None


def infer_vision_config(shapes: Mapping[str, Sequence[int]]) -> VisionConfig:
    """CLIP tower config from its weights: layers from key indices, width, heads = width / 64, sizes."""
    p = VIT_PREFIX
    try:
        width, _, patch, _ = shapes[p + "embeddings.patch_embedding.weight"]
        positions, _ = shapes[p + "embeddings.position_embedding.weight"]
        ffn, _ = shapes[p + "encoder.layers.0.mlp.fc1.weight"]
    except KeyError as e:
        raise ConfigError(f"checkpoint has no vision tensor {e.args[0]!r}, needed to infer the vision tower") from None
    layers = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(p) + r"encoder\.layers\.(\d+)\.", k))}
    grid = math.isqrt(int(positions) - 1)
    if grid * grid + 1 != positions:
        raise ConfigError(f"position_embedding has {positions} rows, not a square grid plus a class token")
    return VisionConfig(
        hidden_size=int(width), num_hidden_layers=max(layers) + 1, num_attention_heads=max(1, int(width) // 64),
        intermediate_size=int(ffn), image_size=grid * int(patch), patch_size=int(patch),
    )


# ---- presets -----------------------------------------------------------------------------------------
def preset(name: str) -> XComposerConfig:
    """Configs of the three released 7B models, and tiny ones for tests and the demo.

    Names: "ixc2-vl-7b", "ixc2-4khd-7b", "ixc2.5-7b", "tiny-ixc2-vl", "tiny-ixc2-4khd", "tiny-ixc2.5".
    """
    llm7b = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=92544, rope_theta=1e6)
    clip_l = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  patch_size=14)
    tiny_llm = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=512, vocab_size=1000, rope_theta=1e6, max_position_embeddings=4096)
    tiny_vit = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
                    patch_size=14)
    table = {
        "ixc2-vl-7b": ("ixc2-vl", llm7b, dict(rope_scaling={"type": "dynamic", "factor": 1.0},
                                              max_position_embeddings=32768), 490, 4096),
        "ixc2-4khd-7b": ("ixc2-4khd", llm7b, dict(max_position_embeddings=32768), 336, 4096),
        "ixc2.5-7b": ("ixc2.5", llm7b, dict(rope_scaling={"type": "dynamic", "factor": 2.0},
                                            max_position_embeddings=24576), 560, 4096),
        "tiny-ixc2-vl": ("ixc2-vl", tiny_llm, dict(rope_scaling={"type": "dynamic", "factor": 1.0}), 490, 256),
        "tiny-ixc2-4khd": ("ixc2-4khd", tiny_llm, {}, 336, 256),
        "tiny-ixc2.5": ("ixc2.5", tiny_llm, dict(rope_scaling={"type": "dynamic", "factor": 2.0}), 560, 256),
    }
    if name not in table:
        raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(table)}")
    variant, llm, extra, image_size, proj_hidden = table[name]
    vit = clip_l if name.endswith("7b") else tiny_vit
    spec = VARIANTS[variant]
    plora = {n: PLoRAConfig(r, a) for n, r, a in spec.plora_alpha}  # tiny presets keep the real ranks
    return XComposerConfig(
        variant=variant, llm=LLMConfig(**{**llm, **extra}), vision=VisionConfig(image_size=image_size, **vit),
        proj_hidden=proj_hidden, plora=plora,
        task_adapters=TASK_ADAPTERS if variant == "ixc2.5" else (),
        has_post_layernorm=variant != "ixc2-4khd",
    )
