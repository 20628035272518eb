"""The KV cache: explicit per-layer key/value tensors of a fixed capacity, plus how many positions are filled.

The compiled step writes new keys/values into these tensors at their positions and returns the updated
tensors; a capacity change needs no recompilation because the capacity dimension is dynamic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from ms_xcomposer.config import LLMConfig

CAPACITY_STEP = 256


def round_capacity(length: int) -> int:
    """Capacities are multiples of CAPACITY_STEP, so a growing sequence reallocates rarely."""
    return max(CAPACITY_STEP, -(-length // CAPACITY_STEP) * CAPACITY_STEP)


@dataclass
class KVCache:
    """keys/values: one Tensor [batch, kv_heads, capacity, head_dim] per layer; `length` filled positions."""

    keys: Tuple[Tensor, ...]
    values: Tuple[Tensor, ...]
    length: int

    @classmethod
    def allocate(cls, cfg: LLMConfig, batch: int, capacity: int, dtype=ms.float32) -> "KVCache":
        shape = (batch, cfg.num_key_value_heads, capacity, cfg.head_dim)
        zeros = tuple(ops.zeros(shape, dtype) for _ in range(2 * cfg.num_hidden_layers))
        return cls(zeros[0::2], zeros[1::2], 0)

    @property
    def capacity(self) -> int:
        return int(self.keys[0].shape[2])

    @property
    def batch(self) -> int:
        return int(self.keys[0].shape[0])

    def grow(self, capacity: int) -> "KVCache":
        """A copy with room for `capacity` positions (the filled ones kept)."""
        if capacity <= self.capacity:
            return self
        pad = capacity - self.capacity

        def widen(t: Tensor) -> Tensor:
            b, h, _, d = t.shape
            return ops.cat((t, ops.zeros((b, h, pad, d), t.dtype)), 2)

        return KVCache(tuple(map(widen, self.keys)), tuple(map(widen, self.values)), self.length)

    def concat(self, other: "KVCache") -> "KVCache":
        """The rows of this cache then those of `other`, at the larger capacity of the two (rows joining a batch)."""
        capacity = max(self.capacity, other.capacity)
        a, b = self.grow(capacity), other.grow(capacity)
        return KVCache(tuple(ops.cat((x, y), 0) for x, y in zip(a.keys, b.keys)),
                       tuple(ops.cat((x, y), 0) for x, y in zip(a.values, b.values)), max(a.length, b.length))

    def select(self, batch_index: Sequence[int]) -> "KVCache":
        """Rows `batch_index` of every layer (beam-search reordering, or repeating a prompt's cache)."""
        idx = Tensor(np.asarray(batch_index, dtype=np.int32))
        return KVCache(tuple(ops.gather(k, idx, 0) for k in self.keys),
                       tuple(ops.gather(v, idx, 0) for v in self.values), self.length)
