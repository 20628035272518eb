"""Device, execution mode and compute-dtype policy: the one place that calls `mindspore.set_context`."""
from __future__ import annotations

from typing import Optional

import mindspore as ms

DEVICES = ("CPU", "GPU", "Ascend")
MODES = {"pynative": ms.PYNATIVE_MODE, "graph": ms.GRAPH_MODE}
DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
# Compute dtypes each device runs; the first is the default. bf16 matmuls have no CPU kernel in
# MindSpore 2.10 ("Select CPU operator[MatMul] fail"), so CPU computes in fp32 (or fp16).
COMPUTE_DTYPES = {"CPU": ("float32", "float16"), "GPU": ("bfloat16", "float16", "float32"),
                  "Ascend": ("bfloat16", "float16", "float32")}


class RuntimeConfigError(ValueError):
    """An unsupported device / mode / dtype combination."""


def normalise_device(device: str) -> str:
    for d in DEVICES:
        if d.lower() == device.lower():
            return d
    raise RuntimeConfigError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")


def setup(device: str = "CPU", mode: str = "pynative", device_id: int = 0) -> None:
    """Select the device (CPU, GPU, Ascend) and the mode (pynative, graph) for everything that follows."""
    device = normalise_device(device)
    if mode.lower() not in MODES:
        raise RuntimeConfigError(f"unknown mode {mode!r}; expected 'pynative' or 'graph'")
    if device != current_device():  # set_device is refused once a kernel has run, even for the same device
        if not device_available(device):
            # Asked first: set_device on a missing device logs two [ERROR] lines and raises a page of C++ context.
            raise RuntimeConfigError(f"{device} is not available: this MindSpore installation or machine has no "
                                     f"usable {device} (use --device CPU)")
        try:
            if device == "CPU":
                ms.set_device("CPU")
            else:
                ms.set_device(device, device_id)
        except RuntimeError as e:
            raise RuntimeConfigError(f"cannot switch to {device} after MindSpore has run in this process: "
                                     f"select the device first ({e})") from None
    if device == "CPU":
        # PyNative's asynchronous dispatch makes the Python thread spin-wait for the backend queue, taking a
        # core from the kernels: on 2 cores one 577x1024 @ 1024x4096 MatMul ran 248 ms async vs 130 ms synced
        # (docs/performance.md, matmul section). Kernels still use all op threads.
        ms.set_context(pynative_synchronize=True)
    ms.set_context(mode=MODES[mode.lower()])


def device_available(device: str) -> bool:
    """Whether MindSpore can run on `device` here (its plug-in is installed and a device is present)."""
    import mindspore.device_context as device_context

    return bool(getattr(device_context, normalise_device(device).lower()).is_available())


def current_device() -> str:
    return ms.get_context("device_target")


def is_graph_mode() -> bool:
    return ms.get_context("mode") == ms.GRAPH_MODE


def compute_dtype(name: Optional[str] = None, device: Optional[str] = None):
    """The MindSpore dtype activations are computed in: `name` if the device supports it, else its default."""
    device = normalise_device(device or current_device())
    allowed = COMPUTE_DTYPES[device]
    if name is None:
        return DTYPES[allowed[0]]
    if name not in DTYPES:
        raise RuntimeConfigError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    if name not in allowed:
        raise RuntimeConfigError(f"{device} cannot compute in {name}; it supports {', '.join(allowed)}")
    return DTYPES[name]
