"""InternViT (InternVL's vision model) as MindSpore Cells; parameter names equal the HF keys under `vision_model.`.

Module tree (as the official `InternVisionModel`): `embeddings.{class_embedding, patch_embedding,
position_embedding}`, `encoder.layers.N.{norm1, attn.{qkv, q_norm, k_norm, proj}, ls1, norm2, mlp.{fc1, fc2},
ls2}`. There is no final norm and no pooler weight.

Both released flavours, chosen by `InternViTConfig`:
- InternViT-6B (V1.5): `norm_type="rms_norm"`, `qk_normalization=True` (q and k each RMS-normalised over all
  heads jointly, i.e. over the C channels before the head split), no qkv bias.
- InternViT-300M (Mini-2B): `norm_type="layer_norm"` (weight and bias), no q/k norm, qkv bias.

The vision RMSNorm (official `InternRMSNorm`: float32 mean of squares, times rsqrt(mean + eps), cast back to
the input dtype, then times the weight; eps = layer_norm_eps) is the same computation as the decoder's
`ms_xcomposer.models.internlm2.RMSNorm`, which takes eps as an argument, so that class is used as is.
(The official code swaps in apex's FusedRMSNorm when apex is installed; not reproduced.)

Dtypes: weights keep their stored dtype; activations are computed in the dtype of `pixel_values` (fp32 or fp16
on CPU), weights cast per call. The attention softmax runs in float32 and is cast back; the official naive
path runs it in the working dtype (identical in fp32, one rounding closer to exact in fp16/bf16).

Position embeddings: the stored grid (image_size // patch_size, 32 for 448) is resized bicubically
(PyTorch `F.interpolate(mode="bicubic", align_corners=False)`, class row kept) to the patch grid of the
input. The official code runs that interpolation on every call; at the stored size it is the identity, so
here it is skipped (`pos_resize` None). For other sizes, `InternVisionModel.pos_resize(h, w)` gives the two
fixed matrices of `ms_xcomposer.bicubic` (computed on the Python side, so the graph holds only matmuls).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import mindspore as ms
from mindspore import Tensor, nn, ops

from ..clip import PatchEmbedding as _BiaslessPatchEmbedding
from ..clip import PosResize, VisionTower, add_class_token_and_positions, resize_position_grid
from ..internlm2 import RMSNorm
from ..layers import GELU, MLP, LayerNorm, Linear, cast_to, zeros_param
from .config import InternViTConfig


def _norm(config: InternViTConfig, dtype) -> nn.Cell:
    """norm1/norm2: RMSNorm (weight only) or LayerNorm (weight and bias), eps = layer_norm_eps."""
    if config.norm_type == "rms_norm":
        return RMSNorm(config.hidden_size, config.layer_norm_eps, dtype)
    return LayerNorm(config.hidden_size, config.layer_norm_eps, dtype)


class PatchEmbedding(_BiaslessPatchEmbedding):
    """Conv2d(3, C, kernel=stride=patch) WITH bias (CLIP's has none), as one matmul over flattened patches."""

    def __init__(self, width: int, patch: int, channels: int = 3, dtype=ms.float32):
        super().__init__(width, patch, channels, dtype)
        self.bias = zeros_param((width,), dtype, "bias")
        self.bias_add = ops.BiasAdd()  # threaded on CPU, unlike the broadcasting Add

    def construct(self, x):
        """x [B, 3, H, W] -> [B, (H // p) * (W // p), C], row-major over the patch grid."""
        y = super().construct(x)
        return self.bias_add(y.reshape(-1, self.width), cast_to(self.bias, y.dtype)).reshape(y.shape)


class InternVisionEmbeddings(nn.Cell):
    """Class token + patch embeddings + position embeddings -> [B, 1 + N, C]."""

    def __init__(self, config: InternViTConfig, dtype=ms.float32):
        super().__init__()
        c = config.hidden_size
        self.class_embedding = zeros_param((1, 1, c), dtype, "class_embedding")
        self.patch_embedding = PatchEmbedding(c, config.patch_size, config.num_channels, dtype)
        self.position_embedding = zeros_param((1, config.num_positions, c), dtype, "position_embedding")

    def construct(self, pixel_values, pos_resize: Optional[PosResize] = None):
        positions = resize_position_grid(ops.cast(self.position_embedding, ms.float32)[0], pos_resize)
        return add_class_token_and_positions(self.patch_embedding(pixel_values), self.class_embedding, positions,
                                             pixel_values.shape, "InternVisionModel")


class InternAttention(nn.Cell):
    """Self-attention with the fused `qkv` ([all q | all k | all v] rows), optional q/k RMSNorm over all heads,
    q scaled by head_dim ** -0.5 after the norm, no mask, and `proj` (with bias)."""

    def __init__(self, config: InternViTConfig, dtype=ms.float32):
        super().__init__()
        c = config.hidden_size
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv = Linear(c, 3 * c, bias=config.qkv_bias, dtype=dtype)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm = RMSNorm(c, config.layer_norm_eps, dtype)
            self.k_norm = RMSNorm(c, config.layer_norm_eps, dtype)
        self.proj = Linear(c, c, dtype=dtype)
        self.bmm_nt = ops.BatchMatMul(transpose_b=True)
        self.bmm = ops.BatchMatMul()

    def _split_heads(self, t, b: int, n: int):
        return t.reshape(b, n, self.heads, self.head_dim).transpose(0, 2, 1, 3)  # [B, heads, N, head_dim]

    def construct(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv[:, :, :c], qkv[:, :, c:2 * c], qkv[:, :, 2 * c:]
        if self.qk_normalization:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q = self._split_heads(q * self.scale, b, n)
        k = self._split_heads(k, b, n)
        v = self._split_heads(v, b, n)
        probs = cast_to(ops.softmax(ops.cast(self.bmm_nt(q, k), ms.float32), -1), x.dtype)
        out = self.bmm(probs, v).transpose(0, 2, 1, 3).reshape(b, n, c)
        return self.proj(out)


class InternMLP(MLP):
    """fc1 -> exact (erf) GELU -> fc2, both with bias."""

    def __init__(self, config: InternViTConfig, dtype=ms.float32):
        super().__init__(config.hidden_size, config.intermediate_size, GELU(), dtype)


class InternVisionEncoderLayer(nn.Cell):
    """Pre-norm block with layer scale: x + ls1 * attn(norm1(x)), then x + ls2 * mlp(norm2(x))."""

    def __init__(self, config: InternViTConfig, dtype=ms.float32):
        super().__init__()
        self.attn = InternAttention(config, dtype)
        self.mlp = InternMLP(config, dtype)
        self.norm1 = _norm(config, dtype)
        self.norm2 = _norm(config, dtype)
        self.ls1 = zeros_param((config.hidden_size,), dtype, "ls1")
        self.ls2 = zeros_param((config.hidden_size,), dtype, "ls2")

    def construct(self, x):
        x = x + self.attn(self.norm1(x)) * cast_to(self.ls1, x.dtype)
        return x + self.mlp(self.norm2(x)) * cast_to(self.ls2, x.dtype)


class InternVisionEncoder(nn.Cell):
    def __init__(self, config: InternViTConfig, dtype=ms.float32):
        super().__init__()
        self.layers = nn.CellList([InternVisionEncoderLayer(config, dtype) for _ in range(config.num_hidden_layers)])

    def construct(self, x, num_layers: int, output_hidden_states: bool = False):
        """Runs the first `num_layers` layers; returns (output, (input, layer 1 .. layer num_layers) or ())."""
        states = (x,)
        for i in range(num_layers):
            x = self.layers[i](x)
            if output_hidden_states:
                states = states + (x,)
        if output_hidden_states:
            return x, states
        return x, ()


class InternVisionModel(nn.Cell):
    """InternViT returning HF hidden state `select_layer` [B, 1 + N, C] (class token included, no final norm).

    Args:
        config: the vision config.
        dtype: storage dtype of the parameters (ms.float32, ms.float16 or ms.bfloat16).
        select_layer: which HF `hidden_states` entry to return: -1 (= `last_hidden_state`), -4, ..., or a
            non-negative index (0 = embeddings). Layers after it are loaded but never run.
    """

    def __init__(self, config: InternViTConfig, dtype=ms.float32, select_layer: int = -1):
        super().__init__()
        n = config.num_hidden_layers
        if not -(n + 1) <= select_layer <= n:
            raise ValueError(f"select_layer {select_layer} out of range for {n} layers (-{n + 1}..{n})")
        self.config = config
        self.num_layers_run = select_layer % (n + 1)  # hidden state k = output of the first k layers
        self.embeddings = InternVisionEmbeddings(config, dtype)
        self.encoder = InternVisionEncoder(config, dtype)
        self._pos_resize_cache: Dict[Tuple[int, int], Optional[PosResize]] = {}

    # Same matrices and cache as the CLIP tower (it reads `config.patch_size`, `config.grid` and the cache).
    pos_resize = VisionTower.pos_resize

    def construct(self, pixel_values, pos_resize: Optional[PosResize] = None, output_hidden_states: bool = False):
        """pixel_values [B, 3, H, W] in the compute dtype -> hidden state `select_layer` [B, 1 + N, C].

        `pos_resize` must be `self.pos_resize(H, W)` (None for the stored grid). With `output_hidden_states`
        returns (that, states): the embeddings output, then each run layer's output.
        """
        x, states = self.encoder(self.embeddings(pixel_values, pos_resize), self.num_layers_run, output_hidden_states)
        if output_hidden_states:
            return x, states
        return x

    def encode(self, pixel_values: Tensor, output_hidden_states: bool = False):
        """`construct` with the position resize for the input's size looked up first (call from Python)."""
        return self(pixel_values, self.pos_resize(pixel_values.shape[2], pixel_values.shape[3]),
                    output_hidden_states)


__all__ = ["PatchEmbedding", "InternVisionEmbeddings", "InternAttention", "InternMLP", "InternVisionEncoderLayer",
           "InternVisionEncoder", "InternVisionModel"]
