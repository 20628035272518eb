"""Test helpers for checkpoints: tiny random HF checkpoints of any preset, and file tampering.

The generic writer lives in the library (`ms_xcomposer.conversion.synthetic`); this adds the test-side pieces:
the golden directories, torch-based reading (an independent judge of what a `.bin` holds), byte surgery.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Dict

import numpy as np

from ms_xcomposer.models.xcomposer2.config import preset
from ms_xcomposer.conversion.synthetic import write_random_hf_checkpoint

DATA = os.path.join(os.path.dirname(__file__), "data", "ixc25_tiny")
GOLDEN_BIN = os.path.join(DATA, "hf")
GOLDEN_ST = os.path.join(DATA, "hf_safetensors")


def tiny_hf_checkpoint(dst: str, preset_name: str = "tiny-ixc2.5", fmt: str = "bin", shards: int = 2,
                       **kwargs) -> str:
    """A random checkpoint of a tiny preset in the real HF layout, with the golden tokenizer files; returns dst."""
    write_random_hf_checkpoint(dst, preset(preset_name), fmt=fmt, shards=shards, tokenizer_dir=GOLDEN_BIN, **kwargs)
    return dst


def load_with_torch(hf_dir: str) -> Dict[str, np.ndarray]:
    """{name: raw bytes (uint8)} of every tensor, read by torch (.bin) or the safetensors library."""
    import torch
    from safetensors.torch import load_file

    out = {}
    files = sorted(glob.glob(os.path.join(hf_dir, "*.bin"))) or sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    for f in files:
        state = torch.load(f, weights_only=True) if f.endswith(".bin") else load_file(f)
        for k, t in state.items():
            out[k] = t.contiguous().reshape(-1).view(torch.uint8).numpy().copy()
    return out


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def truncate(path: str, keep: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)


def edit_json(path: str, edit) -> None:
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    edit(d)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(d, f, indent=2)


def tree_bytes(root: str) -> Dict[str, bytes]:
    """{relative path: content} of every file under root."""
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            p = os.path.join(d, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out
