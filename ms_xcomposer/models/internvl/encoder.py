"""InternVL's image side as one Cell: pixels -> LLM embeddings, the official `extract_feature`.

`ImageEncoder` holds `vision_model` (InternViT) and `mlp1` as direct children, so its parameter names are the
HF keys `vision_model.*` and `mlp1.*`; a chat model that inherits it keeps those names at its top level.
"""
from __future__ import annotations

from typing import Optional

import mindspore as ms
from mindspore import Tensor, nn

from ..clip import PosResize
from .config import InternVLConfig
from .projector import MLP1, vit_tokens
from .vision import InternVisionModel


class ImageEncoder(nn.Cell):
    """vision_model (hidden state `select_layer`) -> drop CLS -> pixel shuffle (ps_version) -> mlp1.

    Args:
        config: the InternVL config (vision, LLM hidden size, select_layer, ps_version, downsample_ratio).
        dtype: storage dtype of the parameters.
    """

    def __init__(self, config: InternVLConfig, dtype=ms.float32):
        super().__init__()
        self.config = config
        self.scale_factor, self.ps_version = config.downsample_ratio, config.ps_version
        self.vision_model = InternVisionModel(config.vision, dtype, config.select_layer)
        self.mlp1 = MLP1(config.projector_in, config.llm.hidden_size, dtype)

    def construct(self, pixel_values, pos_resize: Optional[PosResize] = None):
        """pixel_values [T, 3, S, S] in the compute dtype -> vit_embeds [T, (S/14)^2 / 4, llm hidden]."""
        return self.mlp1(vit_tokens(self.vision_model(pixel_values, pos_resize), self.scale_factor, self.ps_version))

    def extract_feature(self, pixel_values: Tensor) -> Tensor:
        """`construct` with the position resize for the input's size looked up first (call from Python)."""
        return self(pixel_values, self.vision_model.pos_resize(pixel_values.shape[2], pixel_values.shape[3]))


__all__ = ["ImageEncoder"]
