"""The InternVL-1.5 reference model: InternViT -> pixel shuffle -> mlp1 -> `<IMG_CONTEXT>` splice -> InternLM2
(the references' shared decoder with PLoRA off), and the model card's `load_image`, in PyTorch + PIL.

Written from REFERENCE_INTERNVL.md (sections 3-7), importing nothing of the MindSpore port but its pure-Python
config (`InternVLConfig`, read from the HF config.json with the official defaults). Parameter names are the HF
keys (`vision_model.*`, `mlp1.*`, `language_model.model.*`, `language_model.output.weight`). The language model is
an `InternLM2CausalLM`, so decoding is transformers' `generate` (greedy, sampling, beam search), called on
`inputs_embeds` as the official `generate` does.

Deviation kept on purpose (as the MindSpore port): dynamic NTK is computed per call from the sequence length,
not kept process-wide once triggered (REFERENCE_INTERNVL.md quirk 12).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import PretrainedConfig

from ms_xcomposer.config import LLMConfig
from ms_xcomposer.models.internvl.config import InternVLConfig
from ms_xcomposer.reference.causal_lm import InternLM2CausalLM, generation_fields, llm_shape_fields
from ms_xcomposer.reference.checkpoint import config_and_shards, load_state
from ms_xcomposer.reference.internlm2 import DecoderSpec, InternLM2Model
from ms_xcomposer.reference.internvit import InternVisionModel, mlp1, shuffled_tokens

MEAN = (0.485, 0.456, 0.406)  # ImageNet, as the model card's transform
STD = (0.229, 0.224, 0.225)


# ---- the model card's load_image (REFERENCE_INTERNVL.md sections 6 and 7) -------------------------------------
def tile_grid(width: int, height: int, max_num: int, min_num: int = 1, size: int = 448) -> Tuple[int, int]:
    """(cols, rows) of `dynamic_preprocess`: candidates collected in a set (n from min_num to max_num, i and j
    from 1 to n) and sorted by area only; walking them, a strictly closer cols/rows wins, an equal one only when
    the image has more than half the grid's pixels."""
    candidates = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1)
                     for j in range(1, n + 1) if min_num <= i * j <= max_num)
    aspect, best, best_diff = width / height, (1, 1), float("inf")
    for i, j in sorted(candidates, key=lambda g: g[0] * g[1]):
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and width * height > 0.5 * size * size * i * j:
            best = (i, j)
    return best


def load_image(path: Union[str, os.PathLike, Image.Image], max_num: int = 6, size: int = 448) -> torch.Tensor:
    """pixel_values float32 [T, 3, size, size]: the image resized (PIL bicubic, aspect not kept) to the chosen
    grid, cut row-major, plus the original squashed to one tile when the grid has more than one; ToTensor
    (uint8 / 255) and ImageNet Normalize per tile."""
    image = path if isinstance(path, Image.Image) else Image.open(path)
    image = image.convert("RGB")
    cols, rows = tile_grid(image.width, image.height, max_num, size=size)
    big = image.resize((cols * size, rows * size), Image.BICUBIC)
    tiles = [big.crop((x * size, y * size, (x + 1) * size, (y + 1) * size)) for y in range(rows) for x in range(cols)]
    if len(tiles) > 1:
        tiles.append(image.resize((size, size), Image.BICUBIC))
    mean = torch.tensor(MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(STD, dtype=torch.float32)[:, None, None]
    out = [torch.from_numpy(np.array(t)).permute(2, 0, 1).float().div(255).sub(mean).div(std) for t in tiles]
    return torch.stack(out)


# ---- the language model -------------------------------------------------------------------------------------
class ReferenceInternLM2Config(PretrainedConfig):
    """transformers wrapper of an `LLMConfig` (kept as a dict under `llm`)."""

    model_type = "ms_xcomposer_reference_internlm2"

    def __init__(self, llm: Optional[Mapping[str, object]] = None, **kwargs: object) -> None:
        cfg = LLMConfig(**llm) if llm is not None else LLMConfig()
        self.llm = dataclasses.asdict(cfg)
        llm_shape_fields(self, cfg)
        generation_fields(cfg, kwargs)
        super().__init__(**kwargs)


class ReferenceInternLM2ForCausalLM(InternLM2CausalLM):
    """`language_model.*`: InternLM2 without PLoRA (`model`) and the untied `output` head."""

    config_class = ReferenceInternLM2Config

    def __init__(self, config: ReferenceInternLM2Config) -> None:
        super().__init__(config)
        llm = LLMConfig(**config.llm)
        self.model = InternLM2Model(DecoderSpec(llm))
        self.output = nn.Linear(llm.hidden_size, llm.vocab_size, bias=False)
        self.post_init()


# ---- the whole model --------------------------------------------------------------------------------------------
class ReferenceInternVL(nn.Module):
    """InternVLChatModel in PyTorch. Build with `from_pretrained(dir_or_state_dict, config)`; frozen, eval mode,
    computing in the weights' dtype (float32 by default)."""

    def __init__(self, config: InternVLConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = InternVisionModel(config.vision)
        self.mlp1 = mlp1(config.projector_in, config.llm.hidden_size)
        self.language_model = ReferenceInternLM2ForCausalLM(
            ReferenceInternLM2Config(dataclasses.asdict(config.llm)))

    @classmethod
    def from_pretrained(cls, path_or_state: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
                        config: Optional[InternVLConfig] = None,
                        dtype: torch.dtype = torch.float32) -> "ReferenceInternVL":
        """Load an HF InternVL directory (config.json + safetensors or `.bin`) or a {HF key: tensor} state dict
        (which needs `config`); tensors cast to `dtype`. Missing, unexpected or misshaped keys raise ValueError."""
        config, shards = config_and_shards(path_or_state, config, InternVLConfig.from_file, "InternVLConfig")
        with torch.device("meta"):
            model = cls(config)
        load_state(model, shards, dtype)
        return model.eval().requires_grad_(False)

    @classmethod
    def random_state_dict(cls, config: InternVLConfig, seed: int = 0) -> Dict[str, torch.Tensor]:
        """Random float32 weights {HF key: tensor} for tests: matrices N(0, 1/fan_in) (LLM `wqkv` 2x sharper, so
        context matters; `output` 3x, for greedy margins of ~0.5 that beam search can still overturn), norm weights 1 + N(0, 0.1^2), biases
        N(0, 0.05^2), ls1/ls2 U(0.2, 1), class / position embeddings N(0, 0.5^2), token embeddings N(0, 0.1^2)."""
        with torch.device("meta"):
            shapes = {n: tuple(p.shape) for n, p in cls(config).named_parameters()}
        gen = torch.Generator().manual_seed(seed)
        state = {}
        for name, shape in shapes.items():
            x = torch.randn(shape, generator=gen)
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("ls1", "ls2"):
                x = 0.2 + 0.8 * torch.rand(shape, generator=gen)
            elif "norm" in name or name.startswith("mlp1.0."):
                x = 1 + 0.1 * x if leaf == "weight" else 0.05 * x
            elif leaf == "bias":
                x = 0.05 * x
            elif "class_embedding" in name or "position_embedding" in name:
                x = 0.5 * x
            elif "tok_embeddings" in name:
                x = 0.1 * x
            else:
                gain = 2.0 if "wqkv" in name else 3.0 if name == "language_model.output.weight" else 1.0
                x = x / float(np.prod(shape[1:])) ** 0.5 * gain
            state[name] = x
        return state

    @property
    def dtype(self) -> torch.dtype:
        return self.mlp1[1].weight.dtype

    # ---- images ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def image_stages(self, pixel_values) -> Dict[str, object]:
        """Every stage of the official `extract_feature` on pixel_values [T, 3, S, S] (torch or numpy):
        `hidden_states` (embeddings, then each vision layer), `selected` (hidden state `select_layer`),
        `shuffled` (pixel shuffle, CLS dropped: mlp1's input [T, n, 4C]) and `vit_embeds` [T, n, hidden]."""
        pixels = torch.as_tensor(pixel_values).to(self.dtype)
        states = self.vision_model.hidden_states(pixels)
        selected = states[self.config.select_layer]
        shuffled = shuffled_tokens(selected, self.config.ps_version)
        return {"hidden_states": states, "selected": selected, "shuffled": shuffled,
                "vit_embeds": self.mlp1(shuffled)}

    def extract_feature(self, pixel_values) -> torch.Tensor:
        return self.image_stages(pixel_values)["vit_embeds"]

    @torch.no_grad()
    def splice(self, input_ids: Sequence[int], vit_embeds: Optional[torch.Tensor],
               img_context_token_id: int) -> torch.Tensor:
        """[1, S, hidden]: the ids' token embeddings with the rows of `img_context_token_id` overwritten, in order,
        by vit_embeds flattened tile-major (their counts must match)."""
        ids = torch.as_tensor(list(input_ids), dtype=torch.long)
        embeds = self.language_model.model.tok_embeddings(ids).clone()
        if vit_embeds is not None:
            rows = ids == img_context_token_id
            flat = vit_embeds.reshape(-1, embeds.shape[-1])
            if int(rows.sum()) != flat.shape[0]:
                raise ValueError(f"{int(rows.sum())} image-context tokens for {flat.shape[0]} image rows")
            embeds[rows] = flat.to(embeds.dtype)
        return embeds[None]

    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, **kwargs) -> List[List[int]]:
        """transformers' generate on a prompt's embeddings [B, S, hidden] (all rows real): the new ids per row
        (beam search with num_return_sequences gives several rows)."""
        mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long)
        out = self.language_model.generate(inputs_embeds=inputs_embeds, attention_mask=mask, **kwargs)
        sequences = out.sequences if hasattr(out, "sequences") else out
        return [row.tolist() for row in sequences]
