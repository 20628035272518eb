"""The attention core shared by the decoders: rotary embedding, KV-cache write, grouped scores with an additive
bias, softmax, weighted values. Projections stay in each model (InternLM2's fused `wqkv`, LLaMA's q/k/v).

Queries come grouped per KV head, [B, KV, G, S, D] with query head index kv * G + g: the order both InternLM2
(its fused `wqkv` is laid out per KV head) and LLaMA / HF `repeat_kv` (query heads in order, each run of G
heads sharing one KV head) use. Keys and values are [B, KV, S, D]; the caches [B, KV, capacity, D].
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import nn, ops

from ms_xcomposer import runtime


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] over the last axis (the rotary embedding's pairing of the two halves)."""
    half = x.shape[-1] // 2
    return ops.cat((-x[..., half:], x[..., :half]), -1)


class CachedAttention(nn.Cell):
    """Parameter-free attention over an explicit KV cache; see `construct`."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.inv_sqrt_d = 1.0 / math.sqrt(head_dim)
        # Ascend: the fused `flash_attention_score` (16-bit compute only), which never materialises the scores.
        # UNVERIFIED: written from the MindSpore 2.10 API documentation, never run (no Ascend machine here).
        self.fused = runtime.current_device() == "Ascend"
        # Batched products with the transpose as a flag: `keys.swapaxes(-1, -2)` copied the whole key cache
        # every step (CPU Transpose kernel), and `ops.matmul` adds a BroadcastTo in GRAPH mode.
        self.bmm_nt = ops.BatchMatMul(transpose_b=True)
        self.bmm = ops.BatchMatMul()

    def construct(self, q, k, v, cos, sin, positions, bias, k_cache, v_cache):
        """q [B,KV,G,S,D], k/v [B,KV,S,D] (before RoPE); cos/sin [B,S,D]; positions [B,S] int32 (each row's cache
        slots); bias [B,S,L] float32 (0 visible, -1e30 hidden) over the first L <= C cache slots; caches [B,KV,C,D].

        Returns (out [B, S, KV*G*D] with heads in order kv * G + g, k_cache, v_cache), the S new keys/values
        of each row written at its `positions`. Scores and softmax run in float32.
        """
        b, kv, g, s, d = q.shape
        cos_k, sin_k = cos.reshape(b, 1, s, d), sin.reshape(b, 1, s, d)
        q = q * cos_k.reshape(b, 1, 1, s, d) + rotate_half(q) * sin_k.reshape(b, 1, 1, s, d)
        k = k * cos_k + rotate_half(k) * sin_k
        index = ops.broadcast_to(positions.reshape(b, 1, s, 1), k.shape)
        k_cache = ops.tensor_scatter_elements(k_cache, index, k.astype(k_cache.dtype), axis=2)
        v_cache = ops.tensor_scatter_elements(v_cache, index, v.astype(v_cache.dtype), axis=2)
        # Only the slots the bias covers (`engine.attention_span`: the filled part, rounded): a prompt's early
        # chunks skip the empty rest of the cache.
        span = bias.shape[-1]
        keys, values = k_cache[:, :, :span].astype(q.dtype), v_cache[:, :, :span].astype(q.dtype)
        if self.fused and q.dtype != ms.float32:
            # Query heads kv * G + g use KV head kv: the GQA grouping flash attention expects (N1 = KV * G).
            out = ops.flash_attention_score(q.reshape(b, kv * g, s, d), keys, values, kv * g,
                                            attn_mask=(bias < 0).astype(ms.uint8).reshape(b, 1, s, -1),
                                            scalar_value=self.inv_sqrt_d,
                                            input_layout="BNSD")
            return out.transpose(0, 2, 1, 3).reshape(b, s, -1), k_cache, v_cache
        scores = self.bmm_nt(q.reshape(b, kv, g * s, d), keys) * self.inv_sqrt_d
        # Each row's [S, C] bias repeated over its heads, then a same-shape Add: MindSpore's CPU broadcasting Add
        # runs single-threaded, 4-10x slower on prefill-sized scores; Tile + Add costs what a BiasAdd did.
        row_bias = ops.tile(bias.reshape(b, 1, -1), (1, kv * g, 1))
        scores = scores.astype(ms.float32).reshape(b, kv * g, -1) + row_bias
        probs = ops.softmax(scores.reshape(b, kv, g * s, -1), -1).astype(q.dtype)
        out = self.bmm(probs, values).reshape(b, kv, g, s, d).transpose(0, 3, 1, 2, 4).reshape(b, s, -1)
        return out, k_cache, v_cache
