"""Putting checkpoint tensors into a model's Parameters by name (the names are the HF keys)."""
from __future__ import annotations

import warnings
from typing import Callable, Iterable, Mapping, Optional, Protocol

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn


class WeightsError(ValueError):
    """Checkpoint tensors that do not fit the model: missing, unexpected, or of the wrong shape."""


class TensorSource(Protocol):
    """Named tensors. A source may also have `kept_unknown` (names that are not model parameters, kept by
    `convert --keep-unknown`): `load_weights` skips those instead of refusing them."""

    path: str

    def keys(self) -> Iterable[str]: ...

    def shape(self, key: str) -> tuple: ...

    def read_as(self, key: str, dtype: Optional[str] = None) -> np.ndarray:
        """A fresh, writable, C-contiguous array of numpy dtype name `dtype` (None: as stored), owned by the
        caller: `load_weights` hands its buffer to MindSpore without copying."""


class DictSource:
    """A TensorSource over an in-memory {name: array} (tests, the PyTorch reference's state dict). `read_as`
    copies (the caller keeps its arrays)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], path: str = "<memory>"):
        self.tensors, self.path = dict(tensors), path

    def keys(self):
        return self.tensors.keys()

    def shape(self, key):
        return tuple(self.tensors[key].shape)

    def read_as(self, key, dtype=None):
        from ms_xcomposer.conversion.readers import as_ml_dtypes, convert_into, numpy_dtype

        values = as_ml_dtypes(np.asarray(self.tensors[key]))
        out = np.empty(values.shape, values.dtype if dtype is None else numpy_dtype(dtype))
        convert_into(values.reshape(-1), out.reshape(-1))
        return out


class RenamedSource:
    """`source`'s tensors under the model's parameter names: an HF directory read directly through the family's
    key table (`renamed_source`)."""

    def __init__(self, source: TensorSource, names: Mapping[str, str]):
        self.source, self.names, self.path = source, dict(names), source.path

    def keys(self):
        return self.names.keys()

    def shape(self, key):
        return self.source.shape(self.names[key])

    def dtype(self, key):
        return self.source.dtype(self.names[key])

    def read_as(self, key, dtype=None):
        return self.source.read_as(self.names[key], dtype)


def renamed_source(source, table, required: Mapping[str, tuple]) -> RenamedSource:
    """An HF checkpoint (`source` with `shapes()`) seen with MindSpore names, as conversion would name them
    (`conversion.keymap.plan_hf_to_ms` with the family's `table`): buffers and tied copies left out, unknown names
    kept as they are (so `load_weights` reports them). Two tensors for one parameter raise WeightsError."""
    from ms_xcomposer.conversion.keymap import plan_hf_to_ms

    plan = plan_hf_to_ms(source.shapes(), required, table)
    if plan.duplicates:
        target, first, second = plan.duplicates[0]
        raise WeightsError(f"checkpoint {source.path}: tensors {first!r} and {second!r} are both parameter "
                           f"{target!r} (mixed key layouts?)")
    return RenamedSource(source, {**{n: n for n in plan.unknown}, **{m.target: m.source for m in plan.mapped}})


def load_weights(model: nn.Cell, source: TensorSource, dtype: Optional[ms.dtype] = None,
                 skip: Optional[Callable[[str], bool]] = None,
                 progress: Optional[Callable[[int, int], None]] = None) -> None:
    """Set every Parameter of `model` from `source`, bit-exactly unless `dtype` asks for a conversion.

    skip(name): source entries that are not weights (the family key table's dropped buffers, e.g.
    `rotary_emb.inv_freq`, which an HF directory read directly still carries).
    Raises WeightsError listing missing keys, unexpected keys and shape mismatches (all of them at once).
    Keys the source lists in `kept_unknown` are skipped with one warning. `progress(bytes just loaded, total
    bytes)` is called after each tensor.
    """
    params = dict(model.parameters_and_names())
    present = [k for k in source.keys() if not (skip and skip(k))]
    missing = sorted(set(params) - set(present))
    unexpected = sorted(set(present) - set(params))
    kept = set(getattr(source, "kept_unknown", ()))
    skipped = [k for k in unexpected if k in kept]
    if skipped:
        warnings.warn(f"{source.path}: skipping {len(skipped)} tensors that are not model parameters (kept by "
                      f"convert --keep-unknown): {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}")
        unexpected = [k for k in unexpected if k not in kept]
    wrong = [f"{k}: checkpoint {tuple(source.shape(k))}, model {tuple(params[k].shape)}"
             for k in sorted(set(present) & set(params)) if tuple(source.shape(k)) != tuple(params[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {', '.join(unexpected[:20])}"
                        f"{' ...' if len(unexpected) > 20 else ''}")
    if wrong:
        problems.append("shape mismatch: " + "; ".join(wrong[:20]))
    if problems:
        raise WeightsError(f"checkpoint {source.path} does not fit the model: " + " | ".join(problems))
    from ms_xcomposer.runtime import DTYPES

    want = None if dtype is None else {v: k for k, v in DTYPES.items()}[dtype]
    total = sum(int(np.prod(p.shape)) * p.itemsize for p in params.values()) if progress else 0
    for name, param in params.items():
        # Read once (converted block by block when asked), then handed over without a copy: peak memory is
        # the loaded weights plus the tensor in flight (parameters are created unallocated, layers.zeros_param).
        value = Tensor.from_numpy(source.read_as(name, want))
        param.set_dtype(value.dtype)
        param.set_data(value)
        if progress is not None:
            progress(int(np.prod(param.shape)) * param.itemsize, total)
