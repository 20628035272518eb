"""The two-layer MLP projector from vision features to the LLM's width (LLaVA's `mlp2x_gelu`, XComposer2's
`vision_proj`): Linear -> exact GELU -> Linear, with the HF names `0` and `2` (an `nn.Sequential`)."""
from __future__ import annotations

import mindspore as ms
from mindspore import nn

from ms_xcomposer.models.layers import GELU, Linear


class MLPProjector(nn.SequentialCell):
    """in_features -> hidden_features -> out_features; parameters `0.{weight,bias}`, `2.{weight,bias}`."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, dtype=ms.float32):
        super().__init__([Linear(in_features, hidden_features, dtype=dtype), GELU(),
                          Linear(hidden_features, out_features, dtype=dtype)])
