"""InternLM2 with optional PLoRA as MindSpore Cells; parameter names equal the HF keys under `model.`.

Shared by the families whose LLM is InternLM2: XComposer2 (PLoRA on every linear) and InternVL (PLoRA off:
a linear of rank 0 is a plain linear with no extra parameters or cost). Every layer takes the engine's
arguments (`ms_xcomposer.engine`): the per-token mask is the image mask PLoRA applies, and the flags are
(use_plora, infer_mode), compile-time constants.

The KV cache is explicit: every layer takes its key/value cache tensors [B, kv_heads, capacity, head_dim] and
returns updated ones, with the new tokens written at `positions` by a scatter. Attention runs over the whole
capacity with an additive bias (0 for visible, -1e30 for masked/empty slots), so prefill and decode steps
share one graph whose sequence and capacity dimensions are dynamic.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import mindspore as ms
from mindspore import nn, ops

from ms_xcomposer.config import NO_PLORA, PLORA_LINEARS, LLMConfig, PLoRAConfig
from ms_xcomposer.models.attention import CachedAttention
from ms_xcomposer.models.layers import zeros_param
from ms_xcomposer.models.plora import PLoRALinear


class RMSNorm(nn.Cell):
    """x / rms(x) computed in float32, cast back to the input dtype, then times `weight`."""

    def __init__(self, width: int, eps: float, dtype=ms.float32):
        super().__init__()
        self.weight = zeros_param((width,), dtype)
        self.eps = eps

    def construct(self, x):
        h = x.astype(ms.float32)
        h = h * ops.rsqrt(ops.mean(h * h, -1, keep_dims=True) + self.eps)
        w = self.weight if self.weight.dtype == x.dtype else self.weight.astype(x.dtype)
        return w * h.astype(x.dtype)


class Embedding(nn.Cell):
    """Token embedding table `weight` [vocab, hidden]; a gather, cast to the compute dtype."""

    def __init__(self, vocab: int, width: int, dtype=ms.float32):
        super().__init__()
        self.weight = zeros_param((vocab, width), dtype)

    def construct(self, ids, compute_dtype=ms.float32):
        if self.weight.dtype == ms.bfloat16 and compute_dtype != ms.bfloat16:
            # CPU has no bf16 Gather kernel: cast the table first (only when bf16 storage is asked for).
            return ops.gather(self.weight.astype(compute_dtype), ids, 0)
        return ops.gather(self.weight, ids, 0).astype(compute_dtype)


class InternLM2Attention(nn.Cell):
    """Grouped-query attention with the fused, KV-head-grouped `wqkv` and the output projection `wo`."""

    def __init__(self, cfg: LLMConfig, plora: Mapping[str, PLoRAConfig], task_adapters: Sequence[str],
                 task_rank: int, dtype):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.groups = self.num_heads // self.num_kv_heads
        self.wqkv = PLoRALinear(cfg.hidden_size, cfg.qkv_out, plora["wqkv"].rank, plora["wqkv"].alpha,
                                task_adapters, task_rank, dtype)
        self.wo = PLoRALinear(cfg.hidden_size, cfg.hidden_size, plora["wo"].rank, plora["wo"].alpha,
                              task_adapters, task_rank, dtype)
        self.attend = CachedAttention(self.head_dim)

    def construct(self, x, im_mask, cos, sin, positions, bias, k_cache, v_cache, use_plora, infer_mode):
        """x [B,S,H]; cos/sin [B,S,D]; positions [B,S] int32; bias [B,S,C] float32; caches [B,KV,C,D].

        Returns (out [B,S,H], k_cache, v_cache) with the S new keys/values written at `positions`.
        """
        b, s, _ = x.shape
        kv, g, d = self.num_kv_heads, self.groups, self.head_dim
        qkv = self.wqkv(x, im_mask, use_plora, infer_mode).reshape(b, s, kv, g + 2, d)
        q = qkv[:, :, :, :g].transpose(0, 2, 3, 1, 4)  # [B, KV, G, S, D]; head index = kv * G + g
        k = qkv[:, :, :, g].transpose(0, 2, 1, 3)  # [B, KV, S, D]
        v = qkv[:, :, :, g + 1].transpose(0, 2, 1, 3)
        out, k_cache, v_cache = self.attend(q, k, v, cos, sin, positions, bias, k_cache, v_cache)
        return self.wo(out, im_mask, use_plora, infer_mode), k_cache, v_cache


class InternLM2MLP(nn.Cell):
    """w2(silu(w1 x) * w3 x), each a PLoRA linear."""

    def __init__(self, cfg: LLMConfig, plora: Mapping[str, PLoRAConfig], task_adapters: Sequence[str],
                 task_rank: int, dtype):
        super().__init__()
        h, f = cfg.hidden_size, cfg.intermediate_size
        self.w1 = PLoRALinear(h, f, plora["w1"].rank, plora["w1"].alpha, task_adapters, task_rank, dtype)
        self.w3 = PLoRALinear(h, f, plora["w3"].rank, plora["w3"].alpha, task_adapters, task_rank, dtype)
        self.w2 = PLoRALinear(f, h, plora["w2"].rank, plora["w2"].alpha, task_adapters, task_rank, dtype)

    def construct(self, x, im_mask, use_plora, infer_mode):
        gate = ops.silu(self.w1(x, im_mask, use_plora, infer_mode))
        return self.w2(gate * self.w3(x, im_mask, use_plora, infer_mode), im_mask, use_plora, infer_mode)


class InternLM2DecoderLayer(nn.Cell):
    """Pre-norm decoder layer: attention_norm -> attention, ffn_norm -> feed_forward, both residual."""

    def __init__(self, cfg: LLMConfig, plora, task_adapters, task_rank, dtype):
        super().__init__()
        self.attention = InternLM2Attention(cfg, plora, task_adapters, task_rank, dtype)
        self.feed_forward = InternLM2MLP(cfg, plora, task_adapters, task_rank, dtype)
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def construct(self, x, im_mask, cos, sin, positions, bias, k_cache, v_cache, flags):
        """The engine's layer call; flags = (use_plora, infer_mode)."""
        use_plora, infer_mode = flags[0], flags[1]
        h, k_cache, v_cache = self.attention(self.attention_norm(x), im_mask, cos, sin, positions, bias,
                                             k_cache, v_cache, use_plora, infer_mode)
        x = x + h
        x = x + self.feed_forward(self.ffn_norm(x), im_mask, use_plora, infer_mode)
        return x, k_cache, v_cache


class InternLM2Model(nn.Cell):
    """`tok_embeddings`, `layers.N`, final `norm` (the `model.` subtree of the HF checkpoint)."""

    def __init__(self, cfg: LLMConfig, plora: Mapping[str, PLoRAConfig] = None, task_adapters: Sequence[str] = (),
                 task_rank: int = 256, dtype=ms.float32):
        """plora: {linear name: PLoRAConfig}; a linear not named (or of rank 0) is a plain linear."""
        super().__init__()
        plora = {n: plora.get(n, NO_PLORA) for n in PLORA_LINEARS} if plora else dict.fromkeys(PLORA_LINEARS, NO_PLORA)
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.CellList([InternLM2DecoderLayer(cfg, plora, task_adapters, task_rank, dtype)
                                   for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
