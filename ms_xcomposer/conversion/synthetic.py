"""Random XComposer2 checkpoints in the real Hugging Face layout, for tests, the demo and benchmarks.

`write_random_hf_checkpoint(dst, config, fmt="bin"|"safetensors", shards=2, seed=0)` writes `config.json` with
the real repos' field names (no vision tower, as upstream), and every parameter of `config` as random bf16
(or `dtype`) tensors, sharded with an index like `save_pretrained`, or one unsharded file when `shards=1`.

`.bin` files are written without torch: `write_torch_zip` produces the `torch.save` zip format (a zip holding
`<stem>/data.pkl` with protocol-2 pickle opcodes referencing `torch._utils._rebuild_tensor_v2` and typed
storages, `<stem>/data/<i>` raw little-endian storages aligned to 64 bytes, `byteorder`, `version`), which
`torch.load(..., weights_only=True)` reads. Tensors are generated and written in chunks, so a multi-GB
checkpoint needs little memory.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
import zlib
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ms_xcomposer.models.xcomposer2.config import XComposerConfig
from ms_xcomposer.conversion import layout
from ms_xcomposer.conversion.readers import TORCH_STORAGES, dtype_name, numpy_dtype
from ms_xcomposer.conversion.writers import SafetensorsShardWriter, TensorSpec, copy_side_files

_STORAGE_CLASS = {v: k for k, v in TORCH_STORAGES.items()}
_CHUNK = 1 << 22  # elements generated per step


def hf_config_dict(config: XComposerConfig, torch_dtype: str = "bfloat16") -> Dict[str, object]:
    """config.json as the released repos write it: InternLM2 fields only (the vision tower is not described)."""
    llm = config.llm
    return {
        "architectures": ["InternLMXComposer2ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_internlm_xcomposer2.InternLMXcomposer2Config",
            "AutoModel": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM",
        },
        "attn_implementation": "eager",
        "bias": False,
        "bos_token_id": llm.bos_token_id,
        "eos_token_id": llm.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": llm.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": llm.intermediate_size,
        "max_position_embeddings": llm.max_position_embeddings,
        "model_type": "internlm2",
        "num_attention_heads": llm.num_attention_heads,
        "num_hidden_layers": llm.num_hidden_layers,
        "num_key_value_heads": llm.num_key_value_heads,
        "pad_token_id": llm.pad_token_id,
        "rms_norm_eps": llm.rms_norm_eps,
        "rope_scaling": llm.rope_scaling,
        "rope_theta": llm.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
        "transformers_version": "4.33.1",
        "use_cache": False,
        "vocab_size": llm.vocab_size,
    }


# ---- torch zip (.bin) without torch -------------------------------------------------------------------------
class _PickleWriter:
    """Emits the protocol-2 pickle of an OrderedDict of tensors, as `torch.save` does (no memo needed)."""

    def __init__(self) -> None:
        self.out = bytearray(pickle.PROTO + b"\x02")

    def glob(self, module: str, name: str) -> None:
        self.out += pickle.GLOBAL + f"{module}\n{name}\n".encode()

    def string(self, s: str) -> None:
        b = s.encode("utf-8")
        self.out += pickle.BINUNICODE + struct.pack("<I", len(b)) + b

    def integer(self, i: int) -> None:
        if 0 <= i < 1 << 8:
            self.out += pickle.BININT1 + bytes([i])
        elif 0 <= i < 1 << 16:
            self.out += pickle.BININT2 + struct.pack("<H", i)
        elif -(1 << 31) <= i < 1 << 31:
            self.out += pickle.BININT + struct.pack("<i", i)
        else:
            b = i.to_bytes((i.bit_length() + 8) // 8, "little", signed=True)
            self.out += pickle.LONG1 + bytes([len(b)]) + b

    def ints(self, values: Sequence[int]) -> None:
        self.out += pickle.MARK
        for v in values:
            self.integer(v)
        self.out += pickle.TUPLE

    def empty_ordered_dict(self) -> None:
        self.glob("collections", "OrderedDict")
        self.out += pickle.EMPTY_TUPLE + pickle.REDUCE

    def state_dict(self, specs: Sequence[TensorSpec]) -> bytes:
        self.empty_ordered_dict()
        self.out += pickle.MARK
        for i, spec in enumerate(specs):
            numel = int(np.prod(spec.shape, dtype=np.int64))
            strides = [int(np.prod(spec.shape[j + 1:], dtype=np.int64)) for j in range(len(spec.shape))]
            self.string(spec.name)
            self.glob("torch._utils", "_rebuild_tensor_v2")
            self.out += pickle.MARK
            self.out += pickle.MARK  # persistent id: ('storage', <storage class>, key, 'cpu', numel)
            self.string("storage")
            self.glob("torch", _STORAGE_CLASS[spec.dtype])
            self.string(str(i))
            self.string("cpu")
            self.integer(numel)
            self.out += pickle.TUPLE + pickle.BINPERSID
            self.integer(0)  # storage offset
            self.ints(spec.shape)
            self.ints(strides)
            self.out += pickle.NEWFALSE  # requires_grad
            self.empty_ordered_dict()  # backward hooks
            self.out += pickle.TUPLE + pickle.REDUCE
        self.out += pickle.SETITEMS + pickle.STOP
        return bytes(self.out)


def write_torch_zip(path: str, specs: Sequence[TensorSpec], chunks: Callable[[TensorSpec], Iterator[np.ndarray]],
                    alignment: int = 64) -> None:
    """Write a `torch.save`-format state dict. `chunks(spec)` yields the tensor's values (its dtype), in order."""
    stem = os.path.splitext(os.path.basename(path))[0]
    with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
        def member(name: str, size: int) -> zipfile.ZipInfo:
            info = zipfile.ZipInfo(f"{stem}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            info.file_size = size
            # torch pads the local header's extra field ("FB" record) so the data starts aligned
            zip64 = 20 if size * 1.05 > zipfile.ZIP64_LIMIT else 0
            header = 30 + len(info.filename.encode()) + 4 + zip64
            pad = -(f.tell() + header) % alignment
            info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            return info

        def small(name: str, data: bytes) -> None:
            zf.writestr(member(name, len(data)), data)

        pkl = _PickleWriter().state_dict(specs)
        small("data.pkl", pkl)
        small("byteorder", b"little")
        for i, spec in enumerate(specs):
            with zf.open(member(f"data/{i}", spec.nbytes), "w") as out:
                for chunk in chunks(spec):
                    out.write(memoryview(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)))
        small("version", b"3\n")
        small(".data/serialization_id", str(zlib.crc32(pkl)).encode())  # any id; this one keeps files reproducible


# ---- random checkpoints -----------------------------------------------------------------------------------
def _random_chunks(seed: int, scale: Mapping[str, Tuple[float, float]]) -> Callable[[TensorSpec], Iterator[np.ndarray]]:
    """Uniform values with the given (mean, std): much faster to draw than normal ones, as good for tests."""
    def chunks(spec: TensorSpec) -> Iterator[np.ndarray]:
        mean, std = scale.get(spec.name, (0.0, 0.02))
        half = np.float32(std * 3 ** 0.5)  # uniform on [mean - half, mean + half] has this std
        rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
        n = int(np.prod(spec.shape, dtype=np.int64))
        dtype = numpy_dtype(spec.dtype)
        for start in range(0, n, _CHUNK):
            x = rng.random(min(_CHUNK, n - start), dtype=np.float32)
            x *= 2 * half
            x += np.float32(mean) - half
            yield x.astype(dtype)
    return chunks


def _norm_scales(names: Sequence[str]) -> Dict[str, Tuple[float, float]]:
    """Norm weights near 1 (so activations keep their size), std 0.1; everything else mean 0, std 0.02."""
    return {n: (1.0, 0.1) for n in names
            if n.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layrnorm.weight"))}


def write_random_hf_checkpoint(dst: str, config: XComposerConfig, fmt: str = "bin", shards: int = 2, seed: int = 0,
                               dtype: str = "bfloat16", extra_tensors: Optional[Mapping[str, np.ndarray]] = None,
                               omit: Sequence[str] = (), tokenizer_dir: Optional[str] = None) -> List[str]:
    """Write a random checkpoint of `config` into directory `dst` in the real HF layout; returns the weight files.

    fmt: "bin" (torch zip pickles, written without torch) or "safetensors"; shards: number of weight files
    (1 gives the unsharded `pytorch_model.bin` / `model.safetensors`); dtype: stored float dtype;
    extra_tensors: tensors stored as given, replacing the parameter of that name or added after them (buffers,
    unknown keys, wrong shapes for tests); omit: parameter names left out; tokenizer_dir: copy the tokenizer
    files from there. Same arguments, same bytes.
    """
    from ms_xcomposer.models.xcomposer2 import FAMILY

    files = write_random_tensors(dst, FAMILY.parameter_shapes(config), fmt, shards, seed, dtype, extra_tensors, omit)
    with open(os.path.join(dst, layout.CONFIG), "w", encoding="utf-8") as f:
        json.dump(hf_config_dict(config, dtype), f, indent=2)
    if tokenizer_dir:
        copy_side_files(tokenizer_dir, dst)
    return files


def write_random_tensors(dst: str, shapes: Mapping[str, Sequence[int]], fmt: str = "bin", shards: int = 2,
                         seed: int = 0, dtype: str = "bfloat16", extra_tensors: Optional[Mapping[str, np.ndarray]] = None,
                         omit: Sequence[str] = ()) -> List[str]:
    """Write random tensors of `shapes` ({name: shape}, in order) into directory `dst` as HF weight files: the
    weights half of `write_random_hf_checkpoint` (same arguments), for any family. Returns the weight files."""
    if fmt not in ("bin", "safetensors"):
        raise ValueError(f"fmt {fmt!r} not supported; expected 'bin' or 'safetensors'")
    os.makedirs(dst, exist_ok=True)
    extra = {k: np.asarray(v) for k, v in (extra_tensors or {}).items()}
    names = [n for n in shapes if n not in omit] + [k for k in extra if k not in shapes]
    specs = [TensorSpec(n, dtype_name(extra[n].dtype), tuple(extra[n].shape)) if n in extra
             else TensorSpec(n, dtype, shapes[n]) for n in names]
    random_chunks = _random_chunks(seed, _norm_scales([s.name for s in specs]))

    def chunks(spec: TensorSpec) -> Iterator[np.ndarray]:
        return iter([extra[spec.name]]) if spec.name in extra else random_chunks(spec)

    total = sum(s.nbytes for s in specs)
    groups: List[List[TensorSpec]] = [[] for _ in range(max(1, shards))]
    done = 0
    for spec in specs:  # by the byte position where each tensor starts: at most `shards` files
        groups[min(len(groups) - 1, done * len(groups) // max(total, 1))].append(spec)
        done += spec.nbytes
    groups = [g for g in groups if g]
    stem, index_name = ((layout.HF_BIN_STEM, layout.HF_BIN_INDEX) if fmt == "bin"
                        else (layout.HF_ST_STEM, layout.HF_ST_INDEX))
    ext = "bin" if fmt == "bin" else "safetensors"
    single = layout.HF_BIN_SINGLE if fmt == "bin" else layout.HF_ST_SINGLE
    files = [single] if len(groups) == 1 else [layout.shard_name(stem, i + 1, len(groups), ext)
                                               for i in range(len(groups))]
    weight_map = {}
    for name, group in zip(files, groups):
        path = os.path.join(dst, name)
        if fmt == "bin":
            write_torch_zip(path, group, chunks)
        else:
            writer = SafetensorsShardWriter(path, group, {"format": "pt"})
            for spec in group:
                writer.add_chunks(spec, chunks(spec))
            writer.close()
        weight_map.update({s.name: name for s in group})
    if len(groups) > 1:
        with open(os.path.join(dst, index_name), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return [os.path.join(dst, n) for n in files]
