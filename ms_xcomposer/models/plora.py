"""PLoRA: a linear layer with a low-rank update applied only at image-token positions (rank 0: a plain linear).

y = W x + (alpha / r) * B(A(x)) * im_mask, written as a mask multiply (no boolean indexing) so it compiles in
GRAPH mode. IXC-2.5 checkpoints also carry task adapters `lora_{web,sft,dpo}_{A,B}`: the "web" and "write"
inference modes add B(A(x)) of web, or of sft and dpo, at every position with no scaling (W += B @ A).
"""
from __future__ import annotations

from typing import Sequence

import mindspore as ms
from mindspore import nn

from ms_xcomposer.models.layers import Linear, linear, zeros_param



class PLoRALinear(nn.Cell):
    """Bias-free linear `weight` [out, in] plus `Plora_A` [r, in], `Plora_B` [out, r] (none when r is 0) and
    task adapters."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: int,
                 task_adapters: Sequence[str] = (), task_rank: int = 256, dtype=ms.float32):
        super().__init__()
        self.weight = zeros_param((out_features, in_features), dtype)
        self.rank = rank
        if rank:
            self.Plora_A = Linear(in_features, rank, bias=False, dtype=dtype)
            self.Plora_B = Linear(rank, out_features, bias=False, dtype=dtype)
        self.lora_scale = alpha / rank if rank else 0.0
        self.task_adapters = tuple(task_adapters)
        for task in self.task_adapters:
            setattr(self, f"lora_{task}_A", Linear(in_features, task_rank, bias=False, dtype=dtype))
            setattr(self, f"lora_{task}_B", Linear(task_rank, out_features, bias=False, dtype=dtype))

    def construct(self, x, im_mask, use_plora: bool = True, infer_mode: str = "base"):
        """x [B, S, in] (compute dtype), im_mask [B, S, 1] (same dtype, 1 on image tokens) -> [B, S, out].

        `use_plora` and `infer_mode` are compile-time constants: decode steps (no image tokens) skip the
        low-rank branch entirely instead of multiplying it by zero.
        """
        y = linear(x, self.weight)
        if infer_mode == "web":
            y = y + self.lora_web_B(self.lora_web_A(x))
        elif infer_mode == "write":
            y = y + self.lora_sft_B(self.lora_sft_A(x)) + self.lora_dpo_B(self.lora_dpo_A(x))
        if use_plora and self.rank:
            # Mask and scale applied to the rank-r activations, not the [S, out] product: the same values
            # (a 0/1 row mask and, in the released checkpoints, a power-of-two scale commute exactly with B)
            # at r/out of the cost of MindSpore's CPU broadcasting Mul.
            y = y + self.Plora_B(self.Plora_A(x) * (im_mask * self.lora_scale))
        return y
