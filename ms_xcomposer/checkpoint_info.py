"""What a checkpoint directory holds, from its headers only (no tensor is read): `ms-xcomposer info`.

`summarize(path)` opens an HF directory (.bin / safetensors) or a converted MindSpore directory with
`conversion.readers.open_checkpoint` and returns a `CheckpointSummary`: the model config (stored by the converter,
or inferred from config.json and the tensor shapes), parameter counts per component, dtypes, and the tensor
shapes grouped over layers and task adapters (`model.layers.*.attention.wqkv.weight [512, 256] bfloat16 x2`).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np

from ms_xcomposer.conversion.readers import open_checkpoint

# Components that are not weights (every family's `component` may return them).
NOT_WEIGHTS = ("buffers (not weights)", "unknown")
_LAYER = re.compile(r"\.layers\.\d+\.")
_TASK = re.compile(r"\.lora_([A-Za-z]+)_")


@dataclass
class ShapeGroup:
    """Tensors whose names differ only in the layer index (or the task adapter), with one shape and dtype."""

    pattern: str  # the name with `.layers.*.` for the layer index, `lora_*_` for the task adapter
    shape: Tuple[int, ...]
    dtype: str
    count: int


@dataclass
class CheckpointSummary:
    """A checkpoint's headers, summarised. `params` and `bytes` count elements and bytes per component."""

    path: str
    kind: str  # "hf" or "ms"
    format: str  # "bin", "safetensors" or "ckpt"
    files: int
    family: str
    config: object
    tensors: int = 0
    params: Dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    dtypes: Dict[str, int] = field(default_factory=dict)  # dtype -> number of tensors
    groups: List[ShapeGroup] = field(default_factory=list)

    @property
    def total_params(self) -> int:
        """Elements of every weight (buffers and unknown tensors not counted)."""
        return sum(n for c, n in self.params.items() if c not in NOT_WEIGHTS)

    def to_dict(self) -> Dict[str, object]:
        return {
            "path": self.path, "kind": self.kind, "format": self.format, "files": self.files,
            "family": self.family, "tensors": self.tensors, "total_params": self.total_params,
            "bytes": self.bytes, "params": dict(self.params), "dtypes": dict(self.dtypes),
            "config": self.config.to_dict(),
            "shapes": [{"name": g.pattern, "shape": list(g.shape), "dtype": g.dtype, "count": g.count}
                       for g in self.groups],
        }


def group_pattern(name: str) -> str:
    """`name` with the layer index and the task adapter name replaced by `*`."""
    return _TASK.sub(".lora_*_", _LAYER.sub(".layers.*.", name))


def summarize(path: str) -> CheckpointSummary:
    """Summarise the checkpoint at `path` (HF or converted directory, or one shard file) from its headers.

    Raises CheckpointError / ConfigError (ValueErrors) naming the problem when the directory is not a usable
    XComposer2 checkpoint.
    """
    with open_checkpoint(path) as reader:
        family = reader.family
        component = family.component
        summary = CheckpointSummary(reader.path, reader.kind, reader.format, len(reader.files), family.name,
                                    reader.config)
        params: Counter = Counter()
        dtypes: Counter = Counter()
        groups: Dict[Tuple[str, Tuple[int, ...], str], int] = {}
        for key in reader.keys():
            shape, dtype = tuple(reader.shape(key)), reader.dtype(key)
            params[component(key)] += int(np.prod(shape, dtype=np.int64))
            dtypes[dtype] += 1
            summary.bytes += reader.nbytes(key)
            g = (group_pattern(key), shape, dtype)
            groups[g] = groups.get(g, 0) + 1
        summary.tensors = len(reader)
        names = reader.keys()
    order = {c: i for i, c in enumerate(dict.fromkeys(family.components + tuple(params)))}
    summary.params = dict(sorted(params.items(), key=lambda item: order[item[0]]))
    summary.dtypes = dict(sorted(dtypes.items()))
    first_of = {pattern: name for name, pattern in ((k, group_pattern(k)) for k in names)}
    summary.groups = sorted((ShapeGroup(p, s, d, n) for (p, s, d), n in groups.items()),
                            key=lambda g: (order[component(first_of[g.pattern])], g.pattern))
    return summary
