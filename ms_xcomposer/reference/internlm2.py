"""InternLM2 decoder with PLoRA (XComposer2) or without it (InternVL), in plain PyTorch (the reference side of
parity checks).

Module and parameter names follow the Hugging Face checkpoint (`model.layers.N.attention.wqkv.weight`, ...), so
`load_state_dict` of an HF state dict needs no renaming. Everything is written from the facts in REFERENCE.md,
not from the official code, so it can judge the MindSpore port independently.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from ms_xcomposer.config import LLMConfig
from ms_xcomposer.models.xcomposer2.config import INFER_MODES, PLoRAConfig


@dataclass(frozen=True)
class DecoderSpec:
    """What the decoder is built from: the LLM config and the PLoRA of each linear (by name: wqkv, wo, w1, w2, w3;
    a linear without an entry is plain, so an empty map is InternLM2 without PLoRA, as InternVL uses it) and the
    IXC-2.5 task adapters. An `XComposerConfig` has the same fields and is used as it is."""

    llm: LLMConfig
    plora: Mapping[str, PLoRAConfig] = field(default_factory=dict)
    task_adapters: Tuple[str, ...] = ()
    task_adapter_rank: int = 256


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back to the input dtype, then scaled by `weight` [hidden]."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class PLoRALinear(nn.Linear):
    """Bias-free linear with a partial LoRA on image positions: y = W x + (alpha/r) * B(A(x)) * im_mask.

    Parameters: `weight` [out, in], `Plora_A.weight` [r, in], `Plora_B.weight` [out, r], and for IXC-2.5 the task
    adapters `lora_{web,sft,dpo}_{A,B}.weight`, which `task` ("base" | "web" | "write") switches on.
    """

    def __init__(self, in_features: int, out_features: int, plora: PLoRAConfig,
                 task_adapters: Tuple[str, ...] = (), task_rank: int = 256) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.Plora_A = nn.Linear(in_features, plora.rank, bias=False)
        self.Plora_B = nn.Linear(plora.rank, out_features, bias=False)
        self.scale = plora.scale
        self.task_adapters = tuple(task_adapters)
        for name in self.task_adapters:
            setattr(self, f"lora_{name}_A", nn.Linear(in_features, task_rank, bias=False))
            setattr(self, f"lora_{name}_B", nn.Linear(task_rank, out_features, bias=False))
        self.task = "base"

    def forward(self, x: torch.Tensor, im_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [B, L, in]; im_mask: [B, L] bool/0-1 or None (no image rows). Returns [B, L, out]."""
        y = F.linear(x, self.weight)
        for name in INFER_MODES[self.task]:
            y = y + getattr(self, f"lora_{name}_B")(getattr(self, f"lora_{name}_A")(x))
        if im_mask is not None and bool(im_mask.any()):
            lora = self.Plora_B(self.Plora_A(x)) * self.scale
            y = y + lora * im_mask.unsqueeze(-1).to(y.dtype)
        return y


class PlainLinear(nn.Linear):
    """Bias-free linear taking (and ignoring) PLoRA's im_mask: a decoder linear without PLoRA."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor, im_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.linear(x, self.weight)


def decoder_linear(cfg: DecoderSpec, name: str, in_features: int, out_features: int) -> nn.Module:
    """Linear `name` of a decoder layer: a PLoRALinear when `cfg.plora` has it, a PlainLinear otherwise."""
    if name not in cfg.plora:
        return PlainLinear(in_features, out_features)
    return PLoRALinear(in_features, out_features, cfg.plora[name], cfg.task_adapters, cfg.task_adapter_rank)


# ---- rotary position embedding ---------------------------------------------------------------------------
def ntk_scaled_base(base: float, factor: float, seq_len: int, max_positions: int, dim: int) -> float:
    """Dynamic-NTK RoPE base for a sequence of `seq_len` tokens (REFERENCE.md rule).

    Unchanged up to `max_positions`; beyond it base * ((factor * L / max) - (factor - 1)) ** (dim / (dim - 2)).
    """
    if seq_len <= max_positions:
        return base
    return base * ((factor * seq_len / max_positions) - (factor - 1)) ** (dim / (dim - 2))


class RotaryEmbedding(nn.Module):
    """Non-interleaved RoPE (rotate_half) with plain, linear or dynamic-NTK scaling; holds no state.

    The dynamic base depends on the total length (cached + new tokens) of the current call. This equals the
    official rotary cache within one generation from a fresh model: it rebuilds whenever the total length exceeds
    what it holds and max_position_embeddings, so each decode step past the limit rotates its new token with a
    new base while cached keys keep theirs. (The official cache also keeps its last rebuild for later, shorter
    calls; a reference without hidden state does not reproduce that.)
    """

    def __init__(self, dim: int, base: float, max_positions: int, scaling: Optional[Dict[str, object]]) -> None:
        super().__init__()
        self.dim = dim
        self.base = float(base)
        self.max_positions = max_positions
        self.kind = None if scaling is None else str(scaling["type"])
        self.factor = 1.0 if scaling is None else float(scaling["factor"])

    def inv_freq(self, seq_len: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[dim/2] inverse frequencies for a call whose total length is `seq_len`, computed in `dtype`
        (float32, as the official code does, unless `forward` asks for float64)."""
        base = self.base
        if self.kind == "dynamic":
            base = ntk_scaled_base(base, self.factor, seq_len, self.max_positions, self.dim)
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, dtype=dtype) / self.dim))

    def forward(self, position_ids: torch.Tensor, seq_len: int,
                dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, L] int -> (cos, sin), each [B, 1, L, dim] in `dtype`.

        The official code computes the tables in float32 whatever the model's dtype, and so does this reference,
        except in a float64 run once dynamic NTK rescales the base: there the float32 tables depend on the
        platform's `pow` kernel in the last bit, which position p amplifies (`ms_xcomposer/models/rope.py`), so
        a float64 run computes them in float64, as MindSpore does.
        """
        ntk = self.kind == "dynamic" and seq_len > self.max_positions
        table = torch.float64 if dtype == torch.float64 and ntk else torch.float32
        t = position_ids.to(table)
        if self.kind == "linear":
            t = t / self.factor
        freqs = t[..., None] * self.inv_freq(seq_len, table).to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, L, dim] rotated by cos/sin [B, 1, L, dim]."""
    return x * cos + rotate_half(x) * sin


# ---- decoder -----------------------------------------------------------------------------------------------
class InternLM2Attention(nn.Module):
    """GQA attention with the fused `wqkv` in the grouped layout [kv_heads, G + 2, head_dim, hidden]."""

    def __init__(self, cfg: DecoderSpec, layer_idx: int) -> None:
        super().__init__()
        llm = cfg.llm
        self.layer_idx = layer_idx
        self.heads = llm.num_attention_heads
        self.kv_heads = llm.num_key_value_heads
        self.groups = self.heads // self.kv_heads
        self.head_dim = llm.head_dim
        self.wqkv = decoder_linear(cfg, "wqkv", llm.hidden_size, llm.qkv_out)
        self.wo = decoder_linear(cfg, "wo", self.heads * self.head_dim, llm.hidden_size)
        self.rotary_emb = RotaryEmbedding(self.head_dim, llm.rope_theta, llm.max_position_embeddings,
                                          llm.rope_scaling)

    def forward(self, x: torch.Tensor, im_mask: Optional[torch.Tensor], position_ids: torch.Tensor,
                attn_bias: torch.Tensor, cache: Optional[Cache]) -> torch.Tensor:
        """x [B, L, hidden]; attn_bias [B, 1, L, past + L] additive; cache updated in place when given."""
        b, q_len, _ = x.shape
        qkv = self.wqkv(x, im_mask).view(b, q_len, self.kv_heads, self.groups + 2, self.head_dim)
        # Query head kv_idx * G + j: the order that repeating each K/V head G times expects.
        query = qkv[:, :, :, : self.groups].reshape(b, q_len, self.heads, self.head_dim).transpose(1, 2)
        key = qkv[:, :, :, self.groups].transpose(1, 2)
        value = qkv[:, :, :, self.groups + 1].transpose(1, 2)

        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        cos, sin = self.rotary_emb(position_ids, past + q_len, query.dtype)
        query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        key = key.repeat_interleave(self.groups, dim=1)
        value = value.repeat_interleave(self.groups, dim=1)

        scores = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(self.head_dim) + attn_bias
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(probs, value).transpose(1, 2).reshape(b, q_len, self.heads * self.head_dim)
        return self.wo(out, im_mask)


class InternLM2MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), each linear a PLoRA linear (or plain without PLoRA)."""

    def __init__(self, cfg: DecoderSpec) -> None:
        super().__init__()
        h, f = cfg.llm.hidden_size, cfg.llm.intermediate_size
        self.w1 = decoder_linear(cfg, "w1", h, f)
        self.w3 = decoder_linear(cfg, "w3", h, f)
        self.w2 = decoder_linear(cfg, "w2", f, h)

    def forward(self, x: torch.Tensor, im_mask: Optional[torch.Tensor]) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x, im_mask)) * self.w3(x, im_mask), im_mask)


class InternLM2DecoderLayer(nn.Module):
    """Pre-norm block: x + attention(attention_norm(x)), then x + feed_forward(ffn_norm(x))."""

    def __init__(self, cfg: DecoderSpec, layer_idx: int) -> None:
        super().__init__()
        self.attention = InternLM2Attention(cfg, layer_idx)
        self.feed_forward = InternLM2MLP(cfg)
        self.attention_norm = RMSNorm(cfg.llm.hidden_size, cfg.llm.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.llm.hidden_size, cfg.llm.rms_norm_eps)

    def forward(self, x: torch.Tensor, im_mask: Optional[torch.Tensor], position_ids: torch.Tensor,
                attn_bias: torch.Tensor, cache: Optional[Cache]) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), im_mask, position_ids, attn_bias, cache)
        return x + self.feed_forward(self.ffn_norm(x), im_mask)


class InternLM2Model(nn.Module):
    """`model.*` of the checkpoint: tok_embeddings, layers, final norm."""

    def __init__(self, cfg: DecoderSpec) -> None:
        super().__init__()
        llm = cfg.llm
        self.tok_embeddings = nn.Embedding(llm.vocab_size, llm.hidden_size)
        self.layers = nn.ModuleList(InternLM2DecoderLayer(cfg, i) for i in range(llm.num_hidden_layers))
        self.norm = RMSNorm(llm.hidden_size, llm.rms_norm_eps)

    def forward(self, inputs_embeds: torch.Tensor, im_mask: Optional[torch.Tensor], position_ids: torch.Tensor,
                attn_bias: torch.Tensor, cache: Optional[Cache],
                output_hidden_states: bool = False) -> Tuple[torch.Tensor, Optional[List[torch.Tensor]]]:
        """Returns the final-normed hidden states [B, L, hidden] and, if asked, the HF-style list: the
        embeddings, the output of each layer but the last, then the final-normed output (n_layers + 1 items)."""
        hidden = inputs_embeds
        states: Optional[List[torch.Tensor]] = [] if output_hidden_states else None
        for layer in self.layers:
            if states is not None:
                states.append(hidden)
            hidden = layer(hidden, im_mask, position_ids, attn_bias, cache)
        hidden = self.norm(hidden)
        if states is not None:
            states.append(hidden)
        return hidden, states


def attention_bias(q_len: int, past: int, attention_mask: Optional[torch.Tensor], batch: int,
                   dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask [B, 1, q_len, past + q_len]: 0 where a query may attend, finfo.min elsewhere.

    Query i (absolute position past + i) sees keys 0..past + i; `attention_mask` [B, past + q_len] (1 = real
    token, 0 = padding) also hides padded keys.
    """
    total = past + q_len
    keys = torch.arange(total, device=device)
    allowed = keys[None, :] <= (past + torch.arange(q_len, device=device))[:, None]
    allowed = allowed[None, None].expand(batch, 1, q_len, total)
    if attention_mask is not None:
        if attention_mask.shape != (batch, total):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, total)} "
                             f"(batch, cached + new tokens)")
        allowed = allowed & attention_mask[:, None, None, :].bool()
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device))
