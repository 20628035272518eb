"""The full XComposer2 reference model: CLIP tower, separators, projector, InternLM2 with PLoRA, LM head.

An `InternLM2CausalLM` (`causal_lm.py`), so greedy / sampling / beam search come from transformers' `generate`.
"""
from __future__ import annotations

import os
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from transformers import PretrainedConfig

from ms_xcomposer.models.xcomposer2.config import INFER_MODES, XComposerConfig
from ms_xcomposer.reference.causal_lm import InternLM2CausalLM, generation_fields, llm_shape_fields
from ms_xcomposer.reference.checkpoint import config_and_shards, load_state, read_config
from ms_xcomposer.reference.internlm2 import InternLM2Model, PLoRALinear
from ms_xcomposer.reference.vision import VisionTower, assemble_hd, merge_2x2, split_views

TextPiece = Union[torch.Tensor, Sequence[int]]


class ReferenceConfig(PretrainedConfig):
    """transformers wrapper of an `XComposerConfig` (kept as a dict under `xcomposer`)."""

    model_type = "ms_xcomposer_reference"

    def __init__(self, xcomposer: Optional[Mapping[str, object]] = None, **kwargs: object) -> None:
        xc = XComposerConfig.from_dict(xcomposer) if xcomposer is not None else XComposerConfig()
        self.xcomposer = xc.to_dict()
        llm_shape_fields(self, xc.llm)
        generation_fields(xc.llm, kwargs)
        super().__init__(**kwargs)

    @property
    def xc(self) -> XComposerConfig:
        return XComposerConfig.from_dict(self.xcomposer)


class ReferenceXComposer2(InternLM2CausalLM):
    """IXC2-VL / IXC2-4KHD / IXC-2.5 in PyTorch; parameter names are the HF checkpoint keys.

    Build with `from_pretrained(dir_or_state_dict, config)`; all parameters are frozen and the model is in eval
    mode. Computation follows the weights' dtype (float32 by default).
    """

    config_class = ReferenceConfig

    def __init__(self, config: ReferenceConfig) -> None:
        super().__init__(config)
        xc = config.xc
        self.xc = xc
        self.model = InternLM2Model(xc)
        self.output = nn.Linear(xc.llm.hidden_size, xc.llm.vocab_size, bias=False)
        self.vit = VisionTower(xc.vision, xc.has_post_layernorm)
        self.vision_proj = nn.Sequential(nn.Linear(xc.proj_in, xc.proj_hidden), nn.GELU(),
                                         nn.Linear(xc.proj_hidden, xc.llm.hidden_size))
        if xc.spec.hd_tiles:
            self.plora_glb_GN = nn.Parameter(torch.zeros(1, 1, xc.proj_in))
            self.plora_sub_GN = nn.Parameter(torch.zeros(1, 1, 1, xc.proj_in))
        self.post_init()

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_state: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
                        config: Optional[XComposerConfig] = None,
                        dtype: torch.dtype = torch.float32) -> "ReferenceXComposer2":
        """Load an HF directory (config.json + safetensors or `.bin` shards) or a {HF key: tensor} state dict.

        `config` defaults to the directory's (inferred from config.json and the tensor shapes); a state dict
        needs it. Tensors are cast to `dtype` (bf16 checkpoints are upcast to float32 by default). Missing,
        unexpected or wrongly shaped keys raise ValueError; `rotary_emb.inv_freq` buffers are ignored.
        """
        config, shards = config_and_shards(path_or_state, config, read_config, "XComposerConfig")
        with torch.device("meta"):
            model = cls(ReferenceConfig(config.to_dict()))
        load_state(model, shards, dtype)
        return model.eval().requires_grad_(False)

    def set_task(self, mode: str) -> None:
        """IXC-2.5 inference mode: "base" (no task adapter), "web" (lora_web) or "write" (lora_sft + lora_dpo);
        each adapter adds B(A(x)) with no scaling to every PLoRA linear."""
        if mode not in INFER_MODES:
            raise ValueError(f"unknown task mode {mode!r}; expected one of {sorted(INFER_MODES)}")
        absent = [t for t in INFER_MODES[mode] if t not in self.xc.task_adapters]
        if absent:
            raise ValueError(f"mode {mode!r} needs task adapters {absent}, which this checkpoint does not have")
        for module in self.modules():
            if isinstance(module, PLoRALinear):
                module.task = mode

    @classmethod
    def random_state_dict(cls, config: XComposerConfig, seed: int = 0) -> Dict[str, torch.Tensor]:
        """Random float32 weights {HF key: tensor} for `config`, for tests of configs without a golden case.

        Linear weights ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2), embeddings,
        class embedding and separators ~ N(0, 1); Plora_B and the task adapters are non-zero, so PLoRA, the
        separators and each task mode change the outputs.
        """
        with torch.device("meta"):
            shapes = {n: tuple(p.shape) for n, p in cls(ReferenceConfig(config.to_dict())).named_parameters()}
        gen = torch.Generator().manual_seed(seed)
        state = {}
        for name, shape in shapes.items():
            x = torch.randn(shape, generator=gen)
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name or "layrnorm" in name:
                x = 1 + 0.1 * x if leaf == "weight" else 0.1 * x
            elif leaf == "bias":
                x = 0.1 * x
            elif "position_embedding" in name:
                x = 0.1 * x
            elif len(shape) >= 2 and "tok_embeddings" not in name and "_GN" not in name:
                x = x / float(torch.tensor(shape[1:]).prod()) ** 0.5
            state[name] = x
        return state

    # ---- images --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_img_stages(self, pixels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Every stage of one image's encoding. pixels: normalised float [1, 3, H, W] (torch or numpy).

        Returns `vit_input` [T, 3, t, t] (HD: global view then tiles row-major; VL: the image), `vit_features`
        [T, g*g, C] (last encoder layer, CLS dropped), HD only `merged` [T, g/2, g/2, 4C], `assembled` [1, N, D]
        (tokens entering vision_proj: HD separator layout, VL = vit_features) and `img_embeds` [1, N, hidden].
        """
        pixels = torch.as_tensor(pixels).to(self.dtype)
        stages: Dict[str, torch.Tensor] = {}
        if self.xc.spec.hd_tiles:
            glb, tiles, h, w = split_views(pixels, self.xc.tile_size)
            stages["vit_input"] = torch.cat([glb, tiles])
            stages["vit_features"] = self.vit(stages["vit_input"])
            stages["merged"] = merged = merge_2x2(stages["vit_features"])
            stages["assembled"] = assemble_hd(merged[:1], merged[1:], h, w, self.plora_glb_GN, self.plora_sub_GN)
        else:
            if pixels.dim() != 4 or pixels.shape[:2] != (1, 3):
                raise ValueError(f"expected one image [1, 3, H, W], got shape {tuple(pixels.shape)}")
            stages["vit_input"] = pixels
            stages["vit_features"] = stages["assembled"] = self.vit(pixels)
        stages["img_embeds"] = self.vision_proj(stages["assembled"])
        return stages

    def encode_img(self, pixels: torch.Tensor) -> torch.Tensor:
        """One normalised image [1, 3, H, W] -> image embeddings [1, N, hidden] (N = config.image_tokens(h, w))."""
        return self.encode_img_stages(pixels)["img_embeds"]

    def interleave(self, pieces: Sequence[Union[TextPiece, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Concatenate text and image pieces in order into (inputs_embeds [1, L, hidden], im_mask [1, L] bool).

        A text piece is token ids (list, 1-D or [1, n] integer tensor), embedded with `tok_embeddings`, mask 0; an
        image piece is a float tensor [1, N, hidden] from `encode_img`, mask 1. BOS is not added: pass it.
        """
        embeds, masks = [], []
        for i, piece in enumerate(pieces):
            if isinstance(piece, torch.Tensor) and piece.is_floating_point():
                if piece.dim() != 3 or piece.shape[0] != 1 or piece.shape[2] != self.xc.llm.hidden_size:
                    raise ValueError(f"image piece {i} has shape {tuple(piece.shape)}, expected "
                                     f"[1, N, {self.xc.llm.hidden_size}]")
                embeds.append(piece.to(self.dtype))
                masks.append(torch.ones(1, piece.shape[1], dtype=torch.bool))
                continue
            ids = torch.as_tensor(piece, dtype=torch.long).reshape(1, -1)
            embeds.append(self.model.tok_embeddings(ids))
            masks.append(torch.zeros(1, ids.shape[1], dtype=torch.bool))
        if not embeds:
            raise ValueError("interleave needs at least one piece")
        return torch.cat(embeds, dim=1), torch.cat(masks, dim=1)
