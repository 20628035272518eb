"""Rotary position embeddings of InternLM2: plain, linear scaling and dynamic NTK, computed on the host.

cos/sin tables are small ([S, head_dim]) and depend on the total sequence length under dynamic NTK, so they are
built with numpy per call and fed to the compiled graph as inputs. This reproduces the official behaviour: the
rotary cache is rebuilt with a new base whenever the total length exceeds max_position_embeddings, so each new
token is rotated with the base for the current length while keys already in the KV cache keep theirs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ms_xcomposer.config import LLMConfig


def rope_base(cfg: LLMConfig, total_len: int) -> float:
    """The RoPE base used when the sequence (cache + new tokens) is `total_len` long."""
    scaling = cfg.rope_scaling or {}
    if scaling.get("type") == "dynamic" and total_len > cfg.max_position_embeddings:
        f = float(scaling["factor"])
        d = cfg.head_dim
        return cfg.rope_theta * ((f * total_len / cfg.max_position_embeddings) - (f - 1)) ** (d / (d - 2))
    return cfg.rope_theta


def inv_freq(cfg: LLMConfig, total_len: int) -> np.ndarray:
    """[head_dim/2] float32 inverse frequencies, computed in float32 as the official PyTorch code does."""
    d = cfg.head_dim
    exponents = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)
    return (np.float32(1.0) / (np.float32(rope_base(cfg, total_len)) ** exponents)).astype(np.float32)


def cos_sin(cfg: LLMConfig, start: int, length: int, total_len: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """cos, sin [length, head_dim] float32 for positions start .. start+length-1."""
    return cos_sin_at(cfg, np.arange(start, start + length), total_len if total_len is not None else start + length)


def cos_sin_at(cfg: LLMConfig, positions: np.ndarray, total_len: int) -> Tuple[np.ndarray, np.ndarray]:
    """cos, sin [len(positions), head_dim] float32 for the given positions of a sequence `total_len` long (the
    length dynamic NTK scales its base by)."""
    freqs = inv_freq(cfg, total_len)
    positions = np.asarray(positions).astype(np.float32)
    scaling = cfg.rope_scaling or {}
    if scaling.get("type") == "linear":
        positions = positions / np.float32(scaling["factor"])
    angles = np.outer(positions, freqs).astype(np.float32)
    emb = np.concatenate([angles, angles], axis=-1)
    return np.cos(emb), np.sin(emb)
