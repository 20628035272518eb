"""Rotary position embeddings of InternLM2: plain, linear scaling and dynamic NTK, computed on the host.

cos/sin tables are small ([S, head_dim]) and depend on the total sequence length under dynamic NTK, so they are
built with numpy per call and fed to the compiled graph as inputs. This reproduces the official behaviour: the
rotary cache is rebuilt with a new base whenever the total length exceeds max_position_embeddings, so each new
token is rotated with the base for the current length while keys already in the KV cache keep theirs.

Precision: the tables are computed in float64 and rounded to float32 once, at the end. The official code
computes inverse frequencies and angles in float32, so a rotation at position p carries p x (its float32
rounding): the float32 angle itself is off by up to half an ulp of p x inv_freq (1.2e-4 rad at p = 2048), and a
one-ulp difference between two float32 `pow` kernels (numpy's vs PyTorch's SLEEF, for a non-integer dynamic-NTK
base) moves the angle by p x 6e-8 x inv_freq. Measured on the golden IXC-2.5 tiny model against a float64 run
(tables in float64): official float32 tables put the last logits 4.8x (2074 positions) and 5.7x (5000) outside
the fp32 tolerance, float64-rounded tables 0.22x at both (issue 10; tests/test_long_context.py).
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
    """[head_dim/2] float64 inverse frequencies for a call whose total length is `total_len`."""
    d = cfg.head_dim
    return 1.0 / (np.float64(rope_base(cfg, total_len)) ** (np.arange(0, d, 2, dtype=np.float64) / d))


def cos_sin(cfg: LLMConfig, start: int, length: int, total_len: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """cos, sin [length, head_dim] float32 for positions start .. start+length-1 (computed in float64)."""
    return cos_sin_at(cfg, np.arange(start, start + length), total_len if total_len is not None else start + length)


def cos_sin_at(cfg: LLMConfig, positions: np.ndarray, total_len: int) -> Tuple[np.ndarray, np.ndarray]:
    """cos, sin [len(positions), head_dim] float32 for the given positions of a sequence `total_len` long (the
    length dynamic NTK scales its base by), computed in float64 and rounded once."""
    freqs = inv_freq(cfg, total_len)
    positions = np.asarray(positions).astype(np.float64)
    scaling = cfg.rope_scaling or {}
    if scaling.get("type") == "linear":
        positions = positions / float(scaling["factor"])
    angles = np.outer(positions, freqs)
    emb = np.concatenate([angles, angles], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)
