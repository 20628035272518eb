"""CLIP ViT vision tower as MindSpore Cells, with the HF module tree (and so the HF parameter names).

`VisionTower` -> `vision_tower` (CLIPVisionModel) -> `vision_model` (CLIPVisionTransformer) -> `embeddings`,
`pre_layrnorm` (sic), `encoder.layers.N`, `post_layernorm` (loaded, never applied). Held by the XComposer2
model as `vit`, the parameter names are the checkpoint keys `vit.vision_tower.vision_model.*`.

The output is an image feature: by default XComposer2's, the last encoder layer's hidden state with the class
token dropped and no post-LayerNorm (HF `hidden_states[-1][:, 1:]`). Two options of `CLIPVisionModel` /
`VisionTower` give LLaVA's: `feature_layer` (the index into HF's hidden states: 0 the embeddings after
`pre_layrnorm`, i the output of layer i, negative from the end; the layers after it are not run) and
`keep_class_token` (LLaVA's "full" select strategy; "default" drops it).

Dtypes: weights keep their stored dtype (fp32, fp16, bf16); activations are computed in the dtype of the
`pixel_values` given to `construct` (fp32 or fp16 on CPU), weights being cast per call. LayerNorm and the
attention softmax run in fp32.

Position embeddings for an input whose patch grid differs from the stored one are the stored grid resized
bicubically (align_corners=False, class row kept), as transformers' `interpolate_pos_encoding=True`. The
resize is two fixed matrices from `bicubic_matrix`, made on the Python side by `VisionTower.pos_resize(h, w)`
and passed to `construct`, so the graph itself holds only matmuls and compiles in GRAPH mode.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import mindspore as ms
from mindspore import Tensor, nn, ops

from ..bicubic import bicubic_matrix
from ..config import VisionConfig
from .layers import MLP, LayerNorm, Linear, QuickGELU, cast_to, linear, zeros_param

PosResize = Tuple[Tensor, Tensor]


class PatchEmbedding(nn.Cell):
    """Conv2d(3, width, kernel=stride=patch, no bias) as one matmul over flattened patches.

    `weight` is the conv kernel [width, 3, p, p] as stored. Rows/columns past the last whole patch are
    dropped, as the strided convolution does.
    """

    def __init__(self, width: int, patch: int, channels: int = 3, dtype=ms.float32):
        super().__init__()
        self.patch, self.channels, self.width = patch, channels, width
        self.weight = zeros_param((width, channels, patch, patch), dtype)

    def construct(self, x):
        """x [B, C, H, W] -> [B, (H // p) * (W // p), width], row-major over the patch grid."""
        b, c, h, w = x.shape
        p = self.patch
        gh, gw = h // p, w // p
        if h != gh * p or w != gw * p:
            x = x[:, :, : gh * p, : gw * p]
        x = x.reshape(b, c, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * p)
        k = cast_to(self.weight, x.dtype)  # cast before reshaping: CPU has no bf16 Reshape kernel
        return linear(x, k.reshape(self.width, c * p * p))


def resize_position_grid(table, pos_resize: Optional[PosResize] = None):
    """The position table [1 + g*g, width] (class row first, fp32) with its g x g grid resized to gh x gw by
    `pos_resize` = (Wh [gh, g], Ww [gw, g]); the table itself when `pos_resize` is None."""
    if pos_resize is None:
        return table
    wh, ww = pos_resize
    g = wh.shape[1]
    width = table.shape[1]
    grid = table[1:].reshape(g, g * width)
    rows = ops.matmul(wh, grid).reshape(wh.shape[0], g, width)  # resize along the grid's height
    both = ops.matmul(ww, rows)  # [gw, g] @ [gh, g, width] -> [gh, gw, width]: resize along its width
    return ops.concat((table[:1], both.reshape(-1, width)), 0)


def add_class_token_and_positions(patches, class_embedding, positions, pixel_shape, tower: str):
    """[B, N, width] patches -> [B, 1 + N, width]: the class token prepended, then the positions [1 + N, width]
    added. `tower` names the Cell whose `pos_resize` fixes a grid mismatch, for the error message."""
    b, _, width = patches.shape
    cls = cast_to(class_embedding, patches.dtype).reshape(1, 1, width)
    x = ops.concat((ops.broadcast_to(cls, (b, 1, width)), patches), 1)
    if positions.shape[0] != x.shape[1]:
        raise ValueError(
            f"pixel_values {pixel_shape} give {x.shape[1] - 1} patches but the position table has "
            f"{positions.shape[0] - 1}: pass pos_resize={tower}.pos_resize(height, width)"
        )
    return x + ops.cast(positions, x.dtype)


class PositionEmbedding(nn.Cell):
    """Holds the position table `weight` [1 + g*g, width] (class row first) under the HF name."""

    def __init__(self, num_positions: int, width: int, dtype=ms.float32):
        super().__init__()
        self.weight = zeros_param((num_positions, width), dtype)

    def construct(self, pos_resize: Optional[PosResize] = None):
        """The table in fp32, resized to a new patch grid when `pos_resize` = (Wh [gh, g], Ww [gw, g])."""
        return resize_position_grid(ops.cast(self.weight, ms.float32), pos_resize)


class CLIPVisionEmbeddings(nn.Cell):
    """Class token + patch embeddings + position embeddings -> [B, 1 + N, width]."""

    def __init__(self, config: VisionConfig, dtype=ms.float32):
        super().__init__()
        self.class_embedding = zeros_param((config.hidden_size,), dtype, "class_embedding")
        self.patch_embedding = PatchEmbedding(config.hidden_size, config.patch_size, dtype=dtype)
        self.position_embedding = PositionEmbedding(config.num_positions, config.hidden_size, dtype)

    def construct(self, pixel_values, pos_resize: Optional[PosResize] = None):
        return add_class_token_and_positions(self.patch_embedding(pixel_values), self.class_embedding,
                                             self.position_embedding(pos_resize), pixel_values.shape, "VisionTower")


class CLIPAttention(nn.Cell):
    """Multi-head self-attention (scale head_dim ** -0.5), softmax in fp32.

    q, k, v stay three projections: one matmul on their weights concatenated per call ran 2x slower on CPU
    than three (both as `ops.dense`; CLIP-L width, 577 tokens, GRAPH mode: 264 vs 121 ms at batch 1, 412 vs
    205 ms at batch 2, interleaved runs): the weight concat and the 5-D transpose cost more than they save.
    """

    def __init__(self, config: VisionConfig, dtype=ms.float32):
        super().__init__()
        width = config.hidden_size
        self.heads = config.num_attention_heads
        if width % self.heads:
            raise ValueError(f"vision width {width} is not a multiple of num_attention_heads {self.heads}")
        self.head_dim = width // self.heads
        self.scale = self.head_dim ** -0.5
        self.k_proj = Linear(width, width, dtype=dtype)
        self.v_proj = Linear(width, width, dtype=dtype)
        self.q_proj = Linear(width, width, dtype=dtype)
        self.out_proj = Linear(width, width, dtype=dtype)
        self.bmm_nt = ops.BatchMatMul(transpose_b=True)

    def _split_heads(self, t, b: int, n: int):
        return t.reshape(b, n, self.heads, self.head_dim).transpose(0, 2, 1, 3)  # [B, heads, N, head_dim]

    def construct(self, x):
        b, n, width = x.shape
        # Scaling q instead of the N x N scores: fewer multiplies, and exact for head_dim 64 (scale 1/8).
        q = self._split_heads(self.q_proj(x) * self.scale, b, n)
        k = self._split_heads(self.k_proj(x), b, n)
        v = self._split_heads(self.v_proj(x), b, n)
        scores = self.bmm_nt(q, k)
        probs = ops.cast(ops.softmax(ops.cast(scores, ms.float32), -1), x.dtype)
        out = ops.matmul(probs, v).transpose(0, 2, 1, 3).reshape(b, n, width)
        return self.out_proj(out)


class CLIPMLP(MLP):
    """fc1 -> QuickGELU -> fc2."""

    def __init__(self, config: VisionConfig, dtype=ms.float32):
        if config.hidden_act != "quick_gelu":
            raise ValueError(f"vision hidden_act {config.hidden_act!r} not supported: expected 'quick_gelu'")
        super().__init__(config.hidden_size, config.intermediate_size, QuickGELU(), dtype)


class CLIPEncoderLayer(nn.Cell):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: VisionConfig, dtype=ms.float32):
        super().__init__()
        self.self_attn = CLIPAttention(config, dtype)
        self.layer_norm1 = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype)
        self.mlp = CLIPMLP(config, dtype)
        self.layer_norm2 = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype)

    def construct(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Cell):
    """The encoder layers; only the first `run_layers` (default: all) run, the others are loaded and unused."""

    def __init__(self, config: VisionConfig, dtype=ms.float32, run_layers: Optional[int] = None):
        super().__init__()
        self.layers = nn.CellList([CLIPEncoderLayer(config, dtype) for _ in range(config.num_hidden_layers)])
        self.run_layers = config.num_hidden_layers if run_layers is None else run_layers

    def construct(self, x, output_hidden_states: bool = False):
        """Returns (last hidden state run, hidden states) with hidden states = (input, layer 1 .. layer n) or ()."""
        states = (x,)
        for i in range(self.run_layers):
            x = self.layers[i](x)
            if output_hidden_states:
                states = states + (x,)
        if output_hidden_states:
            return x, states
        return x, ()


class CLIPVisionTransformer(nn.Cell):
    def __init__(self, config: VisionConfig, dtype=ms.float32, post_layernorm: bool = True,
                 run_layers: Optional[int] = None):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config, dtype)
        self.pre_layrnorm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype)
        self.encoder = CLIPEncoder(config, dtype, run_layers)
        # Loaded so checkpoints round-trip; XComposer2's features never go through it.
        self.post_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype) if post_layernorm else None

    def construct(self, pixel_values, pos_resize: Optional[PosResize] = None, output_hidden_states: bool = False):
        x = self.pre_layrnorm(self.embeddings(pixel_values, pos_resize))
        return self.encoder(x, output_hidden_states)


class CLIPVisionModel(nn.Cell):
    """HF's CLIPVisionModel tree (`vision_model.*`), returning (features, hidden states).

    feature_layer: which hidden state the features are (see the module doc; default -1, the last layer);
    keep_class_token: keep its class-token row (default False: dropped).
    """

    def __init__(self, config: VisionConfig, dtype=ms.float32, post_layernorm: bool = True, feature_layer: int = -1,
                 keep_class_token: bool = False):
        super().__init__()
        layers = config.num_hidden_layers
        if not -(layers + 1) <= feature_layer <= layers:
            raise ValueError(f"feature_layer {feature_layer} out of range for a tower of {layers} layers")
        self.keep_class_token = keep_class_token
        self.vision_model = CLIPVisionTransformer(config, dtype, post_layernorm, feature_layer % (layers + 1))

    def construct(self, pixel_values, pos_resize: Optional[PosResize] = None, output_hidden_states: bool = False):
        """(features [B, N or 1 + N, width], hidden states: HF's up to the feature layer, or ())."""
        last, states = self.vision_model(pixel_values, pos_resize, output_hidden_states)
        if self.keep_class_token:
            return last, states
        return last[:, 1:], states


class VisionTower(nn.Cell):
    """XComposer2's image encoder: CLIP ViT features of the last layer, class token dropped, no post-LN.

    Args:
        config: the tower's `VisionConfig` (stored position grid = image_size // patch_size).
        dtype: storage dtype of the parameters (ms.float32, ms.float16 or ms.bfloat16).
        post_layernorm: whether the checkpoint has `post_layernorm.*` (False for IXC2-4KHD).
        feature_layer, keep_class_token: as `CLIPVisionModel` (defaults: XComposer2's features).
    """

    def __init__(self, config: VisionConfig, dtype=ms.float32, post_layernorm: bool = True, feature_layer: int = -1,
                 keep_class_token: bool = False):
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVisionModel(config, dtype, post_layernorm, feature_layer, keep_class_token)
        self._pos_resize_cache: Dict[Tuple[int, int], Optional[PosResize]] = {}

    def pos_resize(self, height: int, width: int) -> Optional[PosResize]:
        """Bicubic matrices (Wh [gh, g], Ww [gw, g], fp32) resizing the stored position grid g x g to the
        patch grid of a `height` x `width` input; None when the grids are equal (no resize, as in HF).

        Computed on the Python side and cached per size; pass the result to `construct`.
        """
        p, g = self.config.patch_size, self.config.grid
        gh, gw = height // p, width // p
        if gh < 1 or gw < 1:
            raise ValueError(f"image {height}x{width} is smaller than one {p}x{p} patch")
        if (gh, gw) == (g, g):
            return None
        key = (gh, gw)
        if key not in self._pos_resize_cache:
            # mutable: GRAPH mode takes the pair as inputs instead of folding (and logging) constant tensors.
            self._pos_resize_cache[key] = ms.mutable((Tensor(bicubic_matrix(g, gh)), Tensor(bicubic_matrix(g, gw))))
        return self._pos_resize_cache[key]

    def construct(self, pixel_values, pos_resize: Optional[PosResize] = None, output_hidden_states: bool = False):
        """pixel_values [B, 3, H, W] in the compute dtype -> features [B, (H//p)*(W//p), width], same dtype.

        `pos_resize` must be `self.pos_resize(H, W)` (None when H, W give the stored grid). With
        `output_hidden_states=True` returns (features, hidden_states): HF's tuple of L + 1 tensors
        [B, 1 + N, width] (pre_layrnorm output, then each layer's output, class token included; up to the
        feature layer only).
        """
        features, states = self.vision_tower(pixel_values, pos_resize, output_hidden_states)
        if output_hidden_states:
            return features, states
        return features

    def encode(self, pixel_values: Tensor, output_hidden_states: bool = False):
        """`construct` with the position resize for the input's size looked up first (call from Python)."""
        return self(pixel_values, self.pos_resize(pixel_values.shape[2], pixel_values.shape[3]),
                    output_hidden_states)
