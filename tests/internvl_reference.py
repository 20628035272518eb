"""An independent float64 numpy InternLM2 (the language model of InternVL-1.5), written from
REFERENCE_INTERNVL.md section 5: grouped `wqkv` rows [q x G, k, v] per KV head, rotate-half RoPE with
theta^(-2i/d), causal softmax attention, SwiGLU, RMSNorm (x / rms * weight), untied `output`.

It judges what the golden case does not store (the text-only path). Plain RoPE only: dynamic NTK is a no-op
below max_position_embeddings, which these prompts never reach.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from ms_xcomposer.config import LLMConfig


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def logits(weights: Dict[str, np.ndarray], cfg: LLMConfig, embeds: np.ndarray) -> np.ndarray:
    """embeds [S, H] -> logits [S, vocab], float64. `weights`: the `language_model.` tensors without the prefix."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    x = embeds.astype(np.float64)
    s, nh, nkv, hd = x.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    g = nh // nkv
    angles = np.arange(s)[:, None] * (1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd))[None]
    cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))

    def rope(t):
        return t * cos + np.concatenate([-t[..., hd // 2:], t[..., :hd // 2]], -1) * sin

    mask = np.triu(np.full((s, s), -np.inf), 1)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = _rms(x, w[p + "attention_norm.weight"], cfg.rms_norm_eps)
        qkv = (h @ w[p + "attention.wqkv.weight"].T).reshape(s, nkv, g + 2, hd)
        q = rope(qkv[:, :, :g].reshape(s, nh, hd).transpose(1, 0, 2))
        k = np.repeat(rope(qkv[:, :, g].transpose(1, 0, 2)), g, 0)
        v = np.repeat(qkv[:, :, g + 1].transpose(1, 0, 2), g, 0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + (probs @ v).transpose(1, 0, 2).reshape(s, nh * hd) @ w[p + "attention.wo.weight"].T
        h = _rms(x, w[p + "ffn_norm.weight"], cfg.rms_norm_eps)
        gate = h @ w[p + "feed_forward.w1.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w[p + "feed_forward.w3.weight"].T)) @ w[p + "feed_forward.w2.weight"].T
    return _rms(x, w["model.norm.weight"], cfg.rms_norm_eps) @ w["output.weight"].T


def greedy(weights: Dict[str, np.ndarray], cfg: LLMConfig, ids: List[int], steps: int, eos: List[int]):
    """Greedy continuation of the token ids `ids` (embedded with `model.tok_embeddings`): (new ids, the top-1 /
    top-2 margin of each step). Recomputes the whole prefix each step (no cache: the simplest correct way)."""
    table = weights["model.tok_embeddings.weight"]
    seq, new, margins = list(ids), [], []
    for _ in range(steps):
        last = logits(weights, cfg, table[seq])[-1]
        top2 = np.sort(last)[-2:]
        margins.append(float(top2[1] - top2[0]))
        token = int(last.argmax())
        new.append(token)
        if token in eos:
            break
        seq.append(token)
    return new, margins
