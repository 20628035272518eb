"""The LLaMA decoder as MindSpore Cells; parameter names equal the HF `LlamaModel` keys.

`embed_tokens`, `layers.N.self_attn.{q,k,v,o}_proj`, `layers.N.mlp.{gate,up,down}_proj`,
`layers.N.{input,post_attention}_layernorm`, `norm`: no biases (HF's `attention_bias` / `mlp_bias` false), SiLU
gate, RMSNorm, RoPE, grouped-query attention when kv heads < heads. The output head is not here: the model
owning the decoder holds it (tied or not).

Every layer is called the way the generic engine calls decoder layers:
`layer(x, token_mask, cos, sin, positions, bias, k_cache, v_cache, flags) -> (x, k_cache, v_cache)`;
LLaMA ignores `token_mask` and `flags`. The attention core is `ms_xcomposer.models.attention.CachedAttention`,
shared with InternLM2: HF's q_proj has its heads in order, and head h uses KV head h // G (`repeat_kv`), which is
the core's [B, KV, G, S, D] grouping after a plain reshape.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from ms_xcomposer.config import LLMConfig
from ms_xcomposer.models.attention import CachedAttention
from ms_xcomposer.models.internlm2 import Embedding, RMSNorm
from ms_xcomposer.models.layers import Linear


class LlamaAttention(nn.Cell):
    """`q_proj`, `k_proj`, `v_proj`, `o_proj` (bias-free) around the shared cached attention core."""

    def __init__(self, cfg: LLMConfig, dtype=ms.float32):
        super().__init__()
        self.num_kv_heads, self.head_dim = cfg.num_key_value_heads, cfg.head_dim
        self.groups = cfg.num_attention_heads // cfg.num_key_value_heads
        h, kv_width = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = Linear(h, cfg.num_attention_heads * cfg.head_dim, bias=False, dtype=dtype)
        self.k_proj = Linear(h, kv_width, bias=False, dtype=dtype)
        self.v_proj = Linear(h, kv_width, bias=False, dtype=dtype)
        self.o_proj = Linear(cfg.num_attention_heads * cfg.head_dim, h, bias=False, dtype=dtype)
        self.attend = CachedAttention(cfg.head_dim)

    def construct(self, x, cos, sin, positions, bias, k_cache, v_cache):
        """x [B,S,H]; cos/sin [B,S,D]; positions [B,S] int32; bias [B,S,C] float32; caches [B,KV,C,D]."""
        b, s, _ = x.shape
        kv, g, d = self.num_kv_heads, self.groups, self.head_dim
        q = self.q_proj(x).reshape(b, s, kv, g, d).transpose(0, 2, 3, 1, 4)  # [B, KV, G, S, D]
        k = self.k_proj(x).reshape(b, s, kv, d).transpose(0, 2, 1, 3)  # [B, KV, S, D]
        v = self.v_proj(x).reshape(b, s, kv, d).transpose(0, 2, 1, 3)
        out, k_cache, v_cache = self.attend(q, k, v, cos, sin, positions, bias, k_cache, v_cache)
        return self.o_proj(out), k_cache, v_cache


class LlamaMLP(nn.Cell):
    """down_proj(silu(gate_proj x) * up_proj x)."""

    def __init__(self, cfg: LLMConfig, dtype=ms.float32):
        super().__init__()
        h, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(h, f, bias=False, dtype=dtype)
        self.up_proj = Linear(h, f, bias=False, dtype=dtype)
        self.down_proj = Linear(f, h, bias=False, dtype=dtype)

    def construct(self, x):
        return self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Cell):
    """Pre-norm layer: input_layernorm -> self_attn, post_attention_layernorm -> mlp, both residual."""

    def __init__(self, cfg: LLMConfig, dtype=ms.float32):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, dtype)
        self.mlp = LlamaMLP(cfg, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def construct(self, x, token_mask, cos, sin, positions, bias, k_cache, v_cache, flags):
        """The engine's layer call (see the module docstring); token_mask and flags are unused by LLaMA."""
        h, k_cache, v_cache = self.self_attn(self.input_layernorm(x), cos, sin, positions, bias, k_cache, v_cache)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k_cache, v_cache


class LlamaModel(nn.Cell):
    """`embed_tokens`, `layers.N`, final `norm` (HF's `LlamaModel`, e.g. `language_model.model.*` of llava-hf).

    The engine reaches the embedding as `tok_embeddings(ids, compute_dtype)` (InternLM2's name): a property
    returning `embed_tokens`, so the parameter tree keeps the HF name alone.
    """

    def __init__(self, cfg: LLMConfig, dtype=ms.float32):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.CellList([LlamaDecoderLayer(cfg, dtype) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    @property
    def tok_embeddings(self) -> Embedding:
        return self.embed_tokens
