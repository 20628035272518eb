"""Checkpoint readers, the torch-free .bin writer, the .ckpt writer and to_mindspore_tensor.

Judges: torch.load / the safetensors library for HF files, mindspore.save_checkpoint / load_checkpoint for .ckpt.
"""
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from helpers_checkpoints import GOLDEN_BIN, GOLDEN_ST, load_with_torch, tiny_hf_checkpoint
from ms_xcomposer.models.xcomposer2.config import preset
from ms_xcomposer.conversion import writers
from ms_xcomposer.models.xcomposer2 import FAMILY
from ms_xcomposer.conversion.readers import dtype_name, open_checkpoint, to_mindspore_tensor
from ms_xcomposer.conversion.writers import CkptShardWriter, TensorSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ("tiny-ixc2-vl", "tiny-ixc2-4khd", "tiny-ixc2.5")


@pytest.mark.parametrize("path", [GOLDEN_BIN, GOLDEN_ST])
def test_golden_reads_like_torch(path):
    reference = load_with_torch(path)
    with open_checkpoint(path) as r:
        assert r.kind == "hf" and len(r) == 142 and set(r.keys()) == set(reference)
        for k in r.keys():
            assert np.array_equal(r.read_bytes(k), reference[k]), k
            assert r.dtype(k) == "bfloat16" and r.read(k).dtype == np.dtype(ml_dtypes.bfloat16)
        # config inferred from config.json + shapes; every parameter of that config is present, nothing else
        assert r.config.variant == "ixc2.5" and r.config.task_adapters == ("web", "sft", "dpo")
        assert set(FAMILY.parameter_shapes(r.config)) == set(r.keys())
        assert all(tuple(s) == r.shape(k) for k, s in FAMILY.parameter_shapes(r.config).items())


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_synthetic_checkpoint_real_layout(tmp_path, name, fmt):
    d = tiny_hf_checkpoint(str(tmp_path / "hf"), name, fmt)
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    assert os.path.isfile(os.path.join(d, index)) and os.path.isfile(os.path.join(d, "tokenizer.model"))
    reference = load_with_torch(d)  # torch.load(weights_only=True) reads the torch-free .bin files
    with open_checkpoint(d) as r:
        assert len(r.files) == 2 and set(r.keys()) == set(reference)
        assert all(np.array_equal(r.read_bytes(k), reference[k]) for k in r.keys())
        # the real-style config.json (no vision fields) + shapes infer the preset back
        assert r.config == preset(name)
        assert "vision_config" not in r.hf_config and r.hf_config["model_type"] == "internlm2"


@pytest.mark.parametrize("fmt,single", [("bin", "pytorch_model.bin"), ("safetensors", "model.safetensors")])
def test_single_file_checkpoint(tmp_path, fmt, single):
    d = tiny_hf_checkpoint(str(tmp_path / "hf"), "tiny-ixc2-vl", fmt, shards=1)
    assert sorted(f for f in os.listdir(d) if f.endswith((".bin", ".safetensors", "index.json"))) == [single]
    with open_checkpoint(d) as r, open_checkpoint(os.path.join(d, single)) as f:
        assert r.index_file is None and r.config == preset("tiny-ixc2-vl")
        assert r.keys() == f.keys()


def test_synthetic_is_deterministic(tmp_path):
    a = tiny_hf_checkpoint(str(tmp_path / "a"), "tiny-ixc2-4khd", "bin", seed=3)
    b = tiny_hf_checkpoint(str(tmp_path / "b"), "tiny-ixc2-4khd", "bin", seed=3)
    c = tiny_hf_checkpoint(str(tmp_path / "c"), "tiny-ixc2-4khd", "bin", seed=4)
    name = "pytorch_model-00001-of-00002.bin"
    read = lambda d: open(os.path.join(d, name), "rb").read()  # noqa: E731
    assert read(a) == read(b) != read(c)


def test_strided_and_shared_storages(tmp_path):
    """torch.save of views: a transposed tensor, two slices of one storage, a tensor with a storage offset."""
    import torch

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6).to(torch.bfloat16)
    state = {"t": base.t(), "row": base[1], "tail": base.reshape(-1)[5:17], "whole": base,
             "h": torch.arange(6, dtype=torch.float16)}
    path = str(tmp_path / "views.bin")
    torch.save(state, path)
    with open_checkpoint(path) as r:
        for k, t in state.items():
            expected = t.contiguous().reshape(-1).view(torch.uint8).numpy()
            assert r.shape(k) == tuple(t.shape) and np.array_equal(r.read_bytes(k), expected), k


def test_readers_and_bin_writer_do_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "from ms_xcomposer.models.xcomposer2.config import preset\n"
        "from ms_xcomposer.conversion.synthetic import write_random_hf_checkpoint\n"
        "from ms_xcomposer.conversion.readers import open_checkpoint\n"
        f"write_random_hf_checkpoint({str(tmp_path / 'hf')!r}, preset('tiny-ixc2-vl'), fmt='bin')\n"
        f"r = open_checkpoint({GOLDEN_BIN!r})\n"
        "[r.read(k) for k in r.keys()]\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---- .ckpt -------------------------------------------------------------------------------------------------
def _arrays():
    rng = np.random.default_rng(0)
    special = np.array([0x7FC1, 0xFF81, 0x0001, 0x8000, 0x7F80, 0xFF80], np.uint16).view(ml_dtypes.bfloat16)
    return {
        "a.weight": np.concatenate([rng.standard_normal(15).astype(ml_dtypes.bfloat16), special]).reshape(3, 7),
        "b": rng.standard_normal((7,)).astype(np.float32),
        "c.x": rng.standard_normal((2, 3, 4)).astype(np.float16),
        "s": np.array(3.0, np.float32),
    }


def _write_ckpt(path, arrays):
    w = CkptShardWriter(path)
    for k, v in arrays.items():
        w.add(TensorSpec(k, dtype_name(v.dtype), v.shape), v)
    w.close()


def test_ckpt_writer_bytes_equal_mindspore(tmp_path):
    import mindspore as ms

    arrays = _arrays()
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in arrays.items()], str(tmp_path / "ms.ckpt"))
    _write_ckpt(str(tmp_path / "ours.ckpt"), arrays)
    assert (tmp_path / "ours.ckpt").read_bytes() == (tmp_path / "ms.ckpt").read_bytes()
    loaded = ms.load_checkpoint(str(tmp_path / "ours.ckpt"))
    with open_checkpoint(str(tmp_path / "ms.ckpt")) as r:
        for k, v in arrays.items():
            assert loaded[k].asnumpy().tobytes() == v.tobytes(), k
            assert r.dtype(k) == dtype_name(v.dtype) and r.shape(k) == v.shape
            assert r.read(k).tobytes() == v.tobytes(), k


def test_ckpt_big_tensor_split_into_records(tmp_path, monkeypatch):
    """Tensors over the slice size become consecutive records; MindSpore and the reader join them."""
    import mindspore as ms

    monkeypatch.setattr(writers, "CKPT_SLICE_BYTES", 40)
    arrays = {"big": np.arange(-50, 53, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(103, 1),
              "after": np.arange(5, dtype=np.float32)}
    _write_ckpt(str(tmp_path / "x.ckpt"), arrays)
    with open_checkpoint(str(tmp_path / "x.ckpt")) as r:
        assert len(r.info("big").segments) == 6  # 206 bytes in 40-byte records
        loaded = ms.load_checkpoint(str(tmp_path / "x.ckpt"))
        for k, v in arrays.items():
            assert r.read(k).tobytes() == v.tobytes() == loaded[k].asnumpy().tobytes(), k


# ---- to_mindspore_tensor -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_to_mindspore_tensor_bit_exact(dtype):
    import mindspore as ms

    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 6)).astype(np.float32).astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    if dtype == "bfloat16":  # NaN payloads, subnormal, -0, inf
        x.reshape(-1)[:6] = np.array([0x7FC1, 0xFF81, 0x0001, 0x8000, 0x7F80, 0xFF80], np.uint16).view(x.dtype)
    for arr in (x, x.T, x[:, ::2], x[0, 0]):  # contiguous, transposed, strided, 0-d
        t = to_mindspore_tensor(arr)
        assert t.dtype == {"bfloat16": ms.bfloat16, "float16": ms.float16, "float32": ms.float32}[dtype]
        assert t.shape == arr.shape
        assert t.asnumpy().tobytes() == np.ascontiguousarray(arr).tobytes()



def test_bin_saved_without_crc32(tmp_path):
    """torch.save under set_crc32_options(False) records CRC 0 everywhere; torch.load accepts it, so do we."""
    import zipfile

    import torch
    from ms_xcomposer.conversion.convert import convert

    with open_checkpoint(GOLDEN_BIN) as r:
        state = {k: torch.from_numpy(r.read(k).view(np.int16)).view(torch.bfloat16) for k in r.keys()}
    src = tmp_path / "hf"
    src.mkdir()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, str(src / "pytorch_model.bin"))
    finally:
        torch.serialization.set_crc32_options(True)
    (src / "config.json").write_bytes(open(os.path.join(GOLDEN_BIN, "config.json"), "rb").read())
    assert {m.CRC for m in zipfile.ZipFile(str(src / "pytorch_model.bin")).infolist()} == {0}
    convert(str(src), str(tmp_path / "ms"), check_crc=True, allow_missing_tokenizer=True)
    reference = load_with_torch(GOLDEN_BIN)
    with open_checkpoint(str(tmp_path / "ms")) as r:
        assert all(np.array_equal(r.read_bytes(k), reference[k]) for k in r.keys()) and len(r) == 142


# ---- read_as: the loader's one read, converted block by block ------------------------------------------------
def test_convert_into_bf16_to_float32_is_exact_for_every_bit_pattern():
    from ms_xcomposer.conversion.readers import convert_into

    bits = np.arange(1 << 16, dtype=np.uint16)
    out = np.empty(bits.size, np.float32)
    convert_into(bits.view(ml_dtypes.bfloat16), out)
    assert np.array_equal(out.view(np.uint32), bits.astype(np.uint32) << 16)  # NaN payloads included


@pytest.mark.parametrize("fmt", ["bin", "safetensors", "ckpt"])
def test_read_as_equals_read_then_cast(tmp_path, monkeypatch, fmt):
    """Every tensor in every dtype pair, with blocks of 4 KB so that tensors span several blocks."""
    from ms_xcomposer.conversion import readers
    from ms_xcomposer.conversion.convert import convert

    monkeypatch.setattr(readers, "READ_BLOCK", 4096)
    src = tiny_hf_checkpoint(str(tmp_path / "hf"), "tiny-ixc2-vl", "bin" if fmt == "ckpt" else fmt)
    if fmt == "ckpt":
        convert(src, str(tmp_path / "ms"))
        src = str(tmp_path / "ms")
    with open_checkpoint(src) as r:
        for k in r.keys():
            stored = r.read(k)
            assert r.read_as(k).tobytes() == stored.tobytes()
            for dtype, np_dtype in (("float32", np.float32), ("float16", np.float16),
                                    ("bfloat16", ml_dtypes.bfloat16)):
                got = r.read_as(k, dtype)
                assert got.dtype == np.dtype(np_dtype) and got.shape == stored.shape and got.flags.writeable
                assert got.tobytes() == stored.astype(np_dtype).tobytes(), (k, dtype)


def test_read_as_checks_the_bin_crc(tmp_path, monkeypatch):
    """A converting read streams the storage in blocks and still refuses a corrupted one (zip CRC-32)."""
    from ms_xcomposer.conversion import readers
    from helpers_checkpoints import flip_byte

    monkeypatch.setattr(readers, "READ_BLOCK", 4096)
    src = tiny_hf_checkpoint(str(tmp_path / "hf"), "tiny-ixc2-vl", "bin")
    with open_checkpoint(src) as r:
        key = max(r.keys(), key=r.nbytes)
        path, offset, length = r.file_range(key)
    flip_byte(path, offset + length // 2)
    with open_checkpoint(src) as r:
        with pytest.raises(readers.CheckpointError, match="CRC-32"):
            r.read_as(key, "float32")
        with pytest.raises(readers.CheckpointError, match="CRC-32"):
            r.read_as(key)
