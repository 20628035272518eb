"""Small layers shared by the vision tower and the language model, with HF parameter names."""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import initializer


def zeros_param(shape, dtype=ms.float32, name: str = "weight") -> Parameter:
    """A parameter of zeros whose memory is allocated only when first used: real values come from the
    checkpoint (`weights.load_weights`), so a 7B model is built without a second copy of its weights, and
    `Family.parameter_shapes` can list a model's parameters without allocating them."""
    return Parameter(initializer("zeros", tuple(shape), dtype), name=name)


_MATMUL_NT = ops.MatMul(transpose_b=True)
_BIAS_ADD = ops.BiasAdd()  # the CPU broadcasting Add runs single-threaded; BiasAdd is the same sum, threaded


def cast_to(t, dtype):
    """`t` in `dtype`, without a Cast op when it already is (weights keep their stored dtype; see clip.py)."""
    return t if t.dtype == dtype else ops.cast(t, dtype)


def linear(x, weight, bias=None):
    """x [..., in] @ weight[out, in].T (+ bias [out]) -> [..., out], in x's dtype (weight/bias cast to it).

    One 2-D `MatMul(transpose_b=True)` on x flattened to [-1, in]: the weight is read in its stored layout.
    `x @ weight.T` materialises the transposed weight on every call on CPU (a slow Transpose kernel: 70 ms
    for 4096x1024), and a 3-D x @ 2-D weight becomes BroadcastTo + BatchMatMul in GRAPH mode; together they
    made the CLIP-L tower 1.6x slower (docs/performance.md).
    """
    w = weight if weight.dtype == x.dtype else ops.cast(weight, x.dtype)
    y = _MATMUL_NT(x.reshape(-1, weight.shape[1]), w)  # the weight's static width: x's may be dynamic
    if bias is not None:
        y = _BIAS_ADD(y, bias if bias.dtype == x.dtype else ops.cast(bias, x.dtype))
    return y.reshape(x.shape[:-1] + (weight.shape[0],))


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
        return linear(x, self.weight, self.bias)


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


class MLP(nn.Cell):
    """The vision towers' feed-forward: `fc2(act(fc1(x)))`, both linears with bias (HF names fc1 / fc2)."""

    def __init__(self, width: int, hidden: int, act: nn.Cell, dtype=ms.float32):
        super().__init__()
        self.fc1 = Linear(width, hidden, dtype=dtype)
        self.act = act
        self.fc2 = Linear(hidden, width, dtype=dtype)

    def construct(self, x):
        return self.fc2(self.act(self.fc1(x)))
