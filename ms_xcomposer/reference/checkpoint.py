"""Read an HF XComposer2 directory for the reference model: config, tensor shapes, tensors shard by shard.

Safetensors shards are preferred; pickled `.bin` shards are read with `torch.load(weights_only=True)`, which
rebuilds tensors only and never runs code from the file.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterator, List, Tuple

import torch

from ms_xcomposer.models.xcomposer2.config import XComposerConfig

_SAFETENSORS = ("model.safetensors.index.json", "model.safetensors")
_BIN = ("pytorch_model.bin.index.json", "pytorch_model.bin")


def shard_files(path: str) -> List[str]:
    """The weight files of directory `path`, safetensors first, then `.bin`; raises OSError if none."""
    if not os.path.isdir(path):
        raise OSError(f"{path} is not a directory")
    for index_name, single_name in (_SAFETENSORS, _BIN):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise OSError(f"{index} has no 'weight_map'")
            files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
            missing = [f for f in files if not os.path.isfile(f)]
            if missing:
                raise OSError(f"{index} lists shards that do not exist: {missing}")
            return files
        single = os.path.join(path, single_name)
        if os.path.isfile(single):
            return [single]
    raise OSError(f"{path} has no model.safetensors[.index.json] or pytorch_model.bin[.index.json]")


def _load_shard(file: str) -> Dict[str, torch.Tensor]:
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickles holding anything but tensors and containers
        raise OSError(f"cannot read {file} as a plain tensor checkpoint: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise OSError(f"{file} does not hold a flat {{name: tensor}} state dict")
    return state


def iter_shards(path: str) -> Iterator[Dict[str, torch.Tensor]]:
    """Yield the state dict of each shard of HF directory `path` in turn (tensors in their stored dtype)."""
    for file in shard_files(path):
        yield _load_shard(file)


def tensor_shapes(path: str) -> Dict[str, Tuple[int, ...]]:
    """{name: shape} of every tensor in directory `path`, read from headers where the format allows."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    for file in shard_files(path):
        if file.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        else:
            shapes.update({k: tuple(v.shape) for k, v in _load_shard(file).items()})
    return shapes


def read_config(path: str) -> XComposerConfig:
    """Config of directory `path`: the stored `ms_xcomposer` section of a converted directory, otherwise
    inferred from the HF `config.json` and the checkpoint's tensor shapes."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise OSError(f"{path} has no config.json")
    with open(cfg_path, encoding="utf-8") as f:
        hf_config = json.load(f)
    if "ms_xcomposer" in hf_config:
        return XComposerConfig.from_dict(hf_config["ms_xcomposer"])
    return XComposerConfig.from_hf(hf_config, tensor_shapes(path))
