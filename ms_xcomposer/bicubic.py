"""Bicubic resampling that matches PyTorch's `F.interpolate(mode="bicubic", align_corners=False)`.

MindSpore's CPU bicubic differs from PyTorch's by up to 0.46 on unit-variance data, so the port builds the
same interpolation as two fixed matrices (cubic coefficient -0.75, half-pixel centres, clamped borders,
no antialiasing) and applies them with matmuls: `out = Wh @ x @ Ww.T`. Matmuls also compile in GRAPH mode.
"""
from __future__ import annotations

import functools

import numpy as np

_A = np.float32(-0.75)


def _cubic_near(x: np.ndarray) -> np.ndarray:  # |x| <= 1
    return ((_A + 2) * x - (_A + 3)) * x * x + 1


def _cubic_far(x: np.ndarray) -> np.ndarray:  # 1 < |x| < 2
    return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A


@functools.lru_cache(maxsize=32)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float32 matrix W with `W @ v` = PyTorch's 1-D bicubic resize of v.

    Source coordinates are computed in float32 as PyTorch's CPU kernel does, so rows match it to rounding.
    """
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"bicubic resize needs positive sizes, got {in_size} -> {out_size}")
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    src = scale * (dst + np.float32(0.5)) - np.float32(0.5)
    base = np.floor(src)
    t = (src - base).astype(np.float32)
    weights = np.stack([_cubic_far(t + 1), _cubic_near(t), _cubic_near(1 - t), _cubic_far(2 - t)], axis=1)
    mat = np.zeros((out_size, in_size), dtype=np.float64)
    for k in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + k, 0, in_size - 1)
        np.add.at(mat, (np.arange(out_size), idx), weights[:, k].astype(np.float64))
    return mat.astype(np.float32)


def resize_bicubic_np(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bicubic resize of the last two axes of a float array (any leading axes), PyTorch semantics."""
    wh = bicubic_matrix(x.shape[-2], out_h)
    ww = bicubic_matrix(x.shape[-1], out_w)
    return np.matmul(np.matmul(wh, x.astype(np.float32)), ww.T)
