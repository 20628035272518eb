"""The two-layer MLP projector from vision features to the LLM's width (LLaVA's `mlp2x_gelu`, XComposer2's
`vision_proj`): Linear -> exact GELU -> Linear, under the names each family's checkpoints use."""
from __future__ import annotations

from typing import Tuple

import mindspore as ms
from mindspore import nn

from ms_xcomposer.models.layers import GELU, Linear


class MLPProjector(nn.Cell):
    """in_features -> hidden_features -> out_features. `names` are the two linears' parameter prefixes: ("0", "2")
    for an `nn.Sequential` (XComposer2's `vision_proj.0/2`), ("linear_1", "linear_2") for LLaVA."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, dtype=ms.float32,
                 names: Tuple[str, str] = ("0", "2"), bias: bool = True):
        super().__init__()
        first = Linear(in_features, hidden_features, bias=bias, dtype=dtype)
        second = Linear(hidden_features, out_features, bias=bias, dtype=dtype)
        setattr(self, names[0], first)  # registered under the checkpoint's names
        setattr(self, names[1], second)
        # The same Cells under fixed names for `construct` (not children: no second parameter name).
        object.__setattr__(self, "_first", first)
        object.__setattr__(self, "_second", second)
        self.act = GELU()

    def construct(self, x):
        return self._second(self.act(self._first(x)))
