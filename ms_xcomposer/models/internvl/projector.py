"""InternVL's vision-to-LLM projection: pixel shuffle (0.5, ps_version v1/v2) and `mlp1`.

`vit_tokens(hidden)` is the part of the official `extract_feature` between the ViT and `mlp1`: drop the class
token, view the patches as a square grid, pixel-shuffle it, flatten to tokens. `MLP1` is the projector with the
HF names `0` (LayerNorm over 4C, eps 1e-5: torch's default, not the vision 1e-6), `1` (Linear 4C -> H),
`2` (exact GELU, no parameters) and `3` (Linear H -> H); held as `mlp1`, its keys are `mlp1.{0,1,3}.*`.
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import nn

from ..layers import GELU, LayerNorm, Linear

MLP1_LAYERNORM_EPS = 1e-5


def pixel_shuffle(x, scale_factor: float = 0.5, ps_version: str = "v2"):
    """The official `pixel_shuffle` on x [N, W, H, C] (dim 1 = patch row, dim 2 = patch column).

    For 0.5: the two horizontally adjacent patches are concatenated on channels, the grid transposed, then
    the two vertically adjacent ones; v2 transposes back, v1 leaves the output grid transposed. Output
    [N, H*s, W*s, C/s^2] whose channel block (2*dy + dx) holds patch (2i+dy, 2j+dx). Works on MindSpore
    Tensors (both modes) and on numpy arrays (same reshape/transpose calls).
    """
    if ps_version not in ("v1", "v2"):
        raise ValueError(f"ps_version {ps_version!r}: expected 'v1' or 'v2'")
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.transpose(0, 2, 1, 3)
    x = x.reshape(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    if ps_version == "v2":
        x = x.transpose(0, 2, 1, 3)
    return x


def vit_tokens(hidden, scale_factor: float = 0.5, ps_version: str = "v2"):
    """ViT hidden state [T, 1 + g*g, C] -> pixel-shuffled tokens [T, g*g*s^2, C/s^2] (the input of `mlp1`).

    Token order: row-major over the shuffled grid in v2 (i*16 + j for 448 tiles), transposed in v1.
    """
    t, n, c = hidden.shape
    side = math.isqrt(n - 1)
    if side * side != n - 1:
        raise ValueError(f"vision hidden state has {n - 1} patch tokens, not a square grid")
    x = pixel_shuffle(hidden[:, 1:].reshape(t, side, side, c), scale_factor, ps_version)
    # The tile count is the one free dimension: in GRAPH mode it is dynamic (t reads as -1), and a reshape to
    # (t, -1, ...) then split the tokens wrongly ([160, 16, 64] for 10 tiles of 256 tokens).
    return x.reshape(-1, x.shape[1] * x.shape[2], x.shape[-1])


class MLP1(nn.SequentialCell):
    """LayerNorm(in, eps 1e-5) -> Linear(in, hidden) -> GELU -> Linear(hidden, hidden), HF names 0, 1, 3."""

    def __init__(self, in_features: int, hidden_size: int, dtype=ms.float32):
        super().__init__([
            LayerNorm(in_features, MLP1_LAYERNORM_EPS, dtype),
            Linear(in_features, hidden_size, dtype=dtype),
            GELU(),
            Linear(hidden_size, hidden_size, dtype=dtype),
        ])


__all__ = ["MLP1_LAYERNORM_EPS", "pixel_shuffle", "vit_tokens", "MLP1"]
