"""Shared pytest helpers: MindSpore modes, and the golden checkpoint converted and loaded once per module.

Use the `ms_mode` fixture to run a test once per mode (it yields "pynative" or "graph"), or the
`mindspore_mode(name)` context manager where a single mode is wanted. Both restore PyNative afterwards.
A GRAPH-mode Cell compiles once per input shape, so keep Cells in module-scoped fixtures and reuse shapes.
`converted` is the golden .bin checkpoint converted by the converter; `library` its model and processor.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import mindspore as ms
import pytest

MODES = {"pynative": ms.PYNATIVE_MODE, "graph": ms.GRAPH_MODE}


@contextlib.contextmanager
def mindspore_mode(name: str) -> Iterator[str]:
    """Run the enclosed block in MindSpore mode `name` ("pynative" or "graph"), then go back to PyNative."""
    ms.set_context(mode=MODES[name])
    try:
        yield name
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(params=sorted(MODES))
def ms_mode(request) -> Iterator[str]:
    """Parametrizes a test over both MindSpore modes; the test body runs in that mode."""
    with mindspore_mode(request.param) as name:
        yield name


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    """The golden IXC-2.5 .bin checkpoint converted to a MindSpore directory (once per test module)."""
    from helpers_checkpoints import GOLDEN_BIN
    from ms_xcomposer.conversion.convert import convert

    dst = str(tmp_path_factory.mktemp("converted") / "ms")
    convert(GOLDEN_BIN, dst)
    return dst


@pytest.fixture(scope="module")
def library(converted):
    """(model, processor) of the converted golden checkpoint, loaded by `ms_xcomposer.load` in PyNative mode."""
    from ms_xcomposer import load

    ms.set_context(mode=ms.PYNATIVE_MODE)
    return load(converted)
