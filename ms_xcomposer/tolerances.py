"""The one table of numeric tolerances for MindSpore-vs-PyTorch parity, used by the tests and by `parity`.

Keys are (weight storage dtype, compute dtype) names of the MindSpore side; values are (max_abs,
rel_frobenius) bounds, with rel_frobenius = ||actual - expected||_F / ||expected||_F. The reference is always
PyTorch in float32 on the same (rounded) weights. Bounds were measured on the tiny random test models (2
layers); each row says what it was measured on. A comparison passes only when both metrics are within their
bounds (NaN never passes).

The max_abs bound is for tensors of RMS magnitude up to 1 and scales with the expected tensor's RMS above
that (`magnitude`): floating-point rounding is relative, so the same computation on activations of RMS 6
differs 6x more in absolute terms. Measured on the golden IXC-2.5 case (decoder outputs of RMS 4.6-6.2, max
|x| 30): PyTorch float32 itself is 9.3e-5 away from a float64 run at layer 1, MindSpore 1.2e-4, so a fixed
1e-4 would sit at the judge's own noise floor. rel_frobenius is already relative and is never scaled.
Comparisons whose bound is stated as a literal number (the issue's fp32 "max abs <= 1e-4" for the golden case
and the CLIP tower) pass `scale=False` and get the table's bound unscaled.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

Key = Tuple[str, str]

TOLERANCES: Dict[Key, Tuple[float, float]] = {
    # fp32 compute: rounding-order differences only. CLIP tiny (width 64, 336-560 px): max abs 4.5e-6..7.6e-6,
    # rel 4e-7..6e-7, also from bf16/fp16-stored weights upcast to fp32 (the reference uses the same rounded
    # weights). The bound is the 1e-4 the project states for fp32 parity.
    ("float32", "float32"): (1e-4, 1e-5),
    ("bfloat16", "float32"): (1e-4, 1e-5),
    ("float16", "float32"): (1e-4, 1e-5),
    # fp16 compute vs the fp32 reference: each stored activation carries fp16's relative rounding
    # (2**-11 = 4.9e-4), accumulated over the residual stream. CLIP tiny at 336 px (fp32, fp16 or bf16 weights):
    # max abs 6.7e-3..8.4e-3 on outputs up to ~6.8, rel 7.0e-4..7.8e-4. Tiny LLM (2 layers): max abs 2.45e-2 at
    # RMS 2.4, rel 1.8e-3. Golden IXC-2.5 decoder (RMS 4.6-6.2): rel 2.8e-3..5.3e-3 -- and PyTorch's own fp16
    # run is 2.1e-3..9e-3 (rel) from its fp32 run there, so the rel bound is set at fp16's own spread, 1e-2.
    ("float32", "float16"): (2e-2, 1e-2),
    ("float16", "float16"): (2e-2, 1e-2),
    ("bfloat16", "float16"): (2e-2, 1e-2),
}


def tolerance(key: Key) -> Tuple[float, float]:
    """(max_abs, rel_frobenius) bounds of `key` = (storage dtype, compute dtype); KeyError names the known keys."""
    if key not in TOLERANCES:
        raise KeyError(f"no tolerance for {key}; known: {sorted(TOLERANCES)}")
    return TOLERANCES[key]


def magnitude(expected) -> float:
    """The scale of the max_abs bound for `expected`: its RMS, at least 1."""
    e = _to_numpy(expected)
    return max(1.0, float(np.sqrt(np.mean(e * e)))) if e.size else 1.0


def bounds(key: Key, expected, scale: bool = True) -> Tuple[float, float]:
    """The effective (max_abs, rel_frobenius) bounds for comparing against `expected` under `key`
    (max_abs scaled by `magnitude(expected)` unless `scale` is False)."""
    bound_abs, bound_rel = tolerance(key)
    return bound_abs * (magnitude(expected) if scale else 1.0), bound_rel


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "asnumpy"):  # mindspore.Tensor
        x = x.asnumpy()
    elif hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().float().numpy()
    return np.asarray(x, dtype=np.float64)


def metrics(actual, expected) -> Tuple[float, float]:
    """(max abs difference, relative Frobenius error) of `actual` against `expected` (numpy, MindSpore or torch).

    Raises ValueError when the shapes differ.
    """
    a, e = _to_numpy(actual), _to_numpy(expected)
    if a.shape != e.shape:
        raise ValueError(f"shape mismatch: actual {a.shape} vs expected {e.shape}")
    diff = a - e
    max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
    norm = float(np.linalg.norm(e))
    rel = float(np.linalg.norm(diff)) / norm if norm > 0 else float(np.linalg.norm(diff))
    return max_abs, rel


def within(max_abs: float, rel: float, effective: Tuple[float, float]) -> bool:
    """Whether measured metrics pass `effective` bounds (from `bounds`); written so that NaN fails."""
    return bool(max_abs <= effective[0] and rel <= effective[1])


def assert_close(actual, expected, key: Key, what: str, scale: bool = True) -> Tuple[float, float]:
    """Fail (AssertionError) unless both metrics are within the bounds of `key` for `expected` (see `bounds`);
    returns (max_abs, rel_frobenius). NaN or inf in either array fails; a shape mismatch fails too.
    """
    bound_abs, bound_rel = effective = bounds(key, expected, scale)
    try:
        max_abs, rel = metrics(actual, expected)
    except ValueError as e:
        raise AssertionError(f"{what}: {e}") from None
    if not within(max_abs, rel, effective):
        raise AssertionError(
            f"{what} [{key[0]} weights, {key[1]} compute]: max abs {max_abs:.3e} (bound {bound_abs:.1e}), "
            f"rel Frobenius {rel:.3e} (bound {bound_rel:.0e})"
        )
    return max_abs, rel
