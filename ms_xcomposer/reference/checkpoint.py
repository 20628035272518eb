"""Read an HF directory for the reference models: config, tensor shapes, tensors shard by shard, loading.

Safetensors shards are preferred; pickled `.bin` shards are read with `torch.load(weights_only=True)`, which
rebuilds tensors only and never runs code from the file.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, TypeVar, Union

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


ConfigT = TypeVar("ConfigT")


def config_and_shards(path_or_state: Union[str, os.PathLike, Mapping[str, torch.Tensor]], config: Optional[ConfigT],
                      read_config_of: Callable[[str], ConfigT],
                      config_name: str) -> Tuple[ConfigT, Iterator[Dict[str, torch.Tensor]]]:
    """What a reference `from_pretrained` loads: an HF directory (its config read by `read_config_of` unless
    `config` is given; its shards one at a time) or a {HF key: tensor} state dict (which needs `config`, a
    `config_name`)."""
    if isinstance(path_or_state, Mapping):
        if config is None:
            raise ValueError(f"a state dict needs an explicit {config_name}")
        return config, iter([dict(path_or_state)])
    path = os.fspath(path_or_state)
    return (config if config is not None else read_config_of(path)), iter_shards(path)


def load_state(model: torch.nn.Module, shards: Iterable[Mapping[str, torch.Tensor]], dtype: torch.dtype) -> None:
    """Load every parameter of `model` (built on the meta device) from the {HF key: tensor} `shards`, cast to
    `dtype`. Missing, unexpected or wrongly shaped keys raise ValueError; `rotary_emb.inv_freq` buffers are ignored;
    `position_ids` buffers are rebuilt, any other meta buffer is an error."""
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    loaded, unexpected = set(), []
    for shard in shards:
        chunk = {}
        for name, tensor in shard.items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name not in expected:
                unexpected.append(name)
                continue
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, the config "
                                 f"expects {expected[name]}")
            chunk[name] = tensor.to(dtype=dtype, copy=True)  # the model owns its weights
        model.load_state_dict(chunk, strict=False, assign=True)
        loaded.update(chunk)
    missing = sorted(set(expected) - loaded)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the config: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''} ({len(missing)}), unexpected "
                         f"{sorted(unexpected)[:8]} ({len(unexpected)})")
    for module in model.modules():  # non-persistent buffers built on the meta device
        for name, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if name != "position_ids":
                raise ValueError(f"buffer {name} of {type(module).__name__} is not in the checkpoint")
            module.register_buffer(name, torch.arange(buf.shape[-1]).expand(1, -1), persistent=False)

