"""Rotary position embeddings of InternLM2: plain, linear scaling and dynamic NTK, computed on the host.

cos/sin tables are small ([S, head_dim]) and depend on the total sequence length under dynamic NTK, so they are
built with numpy per call and fed to the compiled graph as inputs. This reproduces the official behaviour: the
rotary cache is rebuilt with a new base whenever the total length exceeds max_position_embeddings, so each new
token is rotated with the base for the current length while keys already in the KV cache keep theirs.

Precision. Up to max_position_embeddings the tables are the official float32 ones (inverse frequencies, angles
and cos/sin in float32, as the official PyTorch code computes them), so parity with it is exact to the last bit
where the float32 `pow` kernels agree. Once dynamic NTK rescales the base (a non-integer base for every length),
they are computed in float64 and rounded once: there the official float32 tables are not reproducible. Two float32
`pow` kernels (numpy / glibc, PyTorch's SLEEF on CPU, CUDA) differ in the last bit of about 2% of the frequencies
that matter, and position p turns one ulp into p x 6e-8 x inv_freq radians: at 5000 positions (NTK base 1.46e6)
numpy's and PyTorch's tables differ by 7.5e-5 rad in one frequency, which moves the golden IXC-2.5 tiny model's
last logits 3.0x the fp32 tolerance away from a float64 run (issue 10); the float64-rounded tables are 0.22x
from it. Exact tables are not used below the limit because the official float32 rounding is what the released
model's parity is judged on there (float64 tables moved the 854-row parity logits by 6.2e-4, over the fp32 bound).
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


def ntk_active(cfg: LLMConfig, total_len: int) -> bool:
    """Whether dynamic NTK rescales the base at this total length (the tables are then computed in float64)."""
    return (cfg.rope_scaling or {}).get("type") == "dynamic" and total_len > cfg.max_position_embeddings


def inv_freq(cfg: LLMConfig, total_len: int, dtype=np.float32) -> np.ndarray:
    """[head_dim/2] inverse frequencies computed in `dtype` (float32: the official formula, op for op)."""
    d = cfg.head_dim
    exponents = np.arange(0, d, 2, dtype=dtype) / dtype(d)
    return (dtype(1.0) / (dtype(rope_base(cfg, total_len)) ** exponents)).astype(dtype)


def cos_sin(cfg: LLMConfig, start: int, length: int, total_len: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """cos, sin [length, head_dim] float32 for positions start .. start+length-1 (see the module doc for the
    precision: official float32 tables, or float64 rounded once when dynamic NTK is active)."""
    return cos_sin_at(cfg, np.arange(start, start + length), total_len if total_len is not None else start + length)


def cos_sin_at(cfg: LLMConfig, positions: np.ndarray, total_len: int) -> Tuple[np.ndarray, np.ndarray]:
    """cos, sin [len(positions), head_dim] float32 for the given positions of a sequence `total_len` long (the
    length dynamic NTK scales its base by), in the precision the module doc describes."""
    dtype = np.float64 if ntk_active(cfg, total_len) else np.float32
    freqs = inv_freq(cfg, total_len, dtype)
    positions = np.asarray(positions).astype(dtype)
    scaling = cfg.rope_scaling or {}
    if scaling.get("type") == "linear":
        positions = positions / dtype(scaling["factor"])
    angles = np.outer(positions, freqs).astype(dtype)
    emb = np.concatenate([angles, angles], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)
