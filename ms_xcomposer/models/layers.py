"""Small layers shared by the vision tower and the language model, with HF parameter names."""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops


def zeros_param(shape, dtype=ms.float32, name: str = "weight") -> Parameter:
    """A parameter of zeros; real values come from the checkpoint (`load_state_dict`)."""
    return Parameter(Tensor(np.zeros(shape, dtype=np.float32)).astype(dtype), name=name)


class Linear(nn.Cell):
    """y = x @ W.T (+ b), W stored [out, in] like torch.nn.Linear.

    Weights keep their stored dtype (e.g. bf16); when it differs from the activations' compute dtype the
    weight is cast per call, so a bf16 checkpoint can run with fp32 compute on CPU.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=ms.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = zeros_param((out_features, in_features), dtype)
        self.bias = zeros_param((out_features,), dtype, "bias") if bias else None

    def construct(self, x):
        w = self.weight if self.weight.dtype == x.dtype else ops.cast(self.weight, x.dtype)
        y = ops.matmul(x, w.T)
        if self.bias is not None:
            b = self.bias if self.bias.dtype == x.dtype else ops.cast(self.bias, x.dtype)
            y = y + b
        return y


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis with HF names `weight` / `bias`, computed in float32."""

    def __init__(self, width: int, eps: float = 1e-5, dtype=ms.float32):
        super().__init__()
        self.weight = zeros_param((width,), dtype)
        self.bias = zeros_param((width,), dtype, "bias")
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x):
        y = self.norm(ops.cast(x, ms.float32), ops.cast(self.weight, ms.float32), ops.cast(self.bias, ms.float32))[0]
        return ops.cast(y, x.dtype)


class GELU(nn.Cell):
    """Exact (erf) GELU, as torch.nn.GELU() in the projector."""

    def construct(self, x):
        return ops.gelu(x, approximate="none")


class QuickGELU(nn.Cell):
    """x * sigmoid(1.702 x), CLIP's activation."""

    def construct(self, x):
        return x * ops.sigmoid(1.702 * x)
