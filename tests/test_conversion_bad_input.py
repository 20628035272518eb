"""Bad input: every case gets a clear error (file, key, expected vs found), exit code 2, and nothing at DST.

Each case builds a tiny broken checkpoint, runs `ms-xcomposer convert` in-process, and checks the message,
the exit code, that DST does not exist and that no temporary directory is left next to it.
"""
import json
import os
import pickle
import shutil
import zipfile

import numpy as np
import pytest

from helpers_checkpoints import GOLDEN_BIN, GOLDEN_ST, edit_json, flip_byte, tiny_hf_checkpoint, tree_bytes, truncate
from ms_xcomposer.cli import main
from ms_xcomposer.conversion import writers
from ms_xcomposer.conversion.convert import convert
from ms_xcomposer.conversion.errors import CheckpointError, UnsafePickleError
from ms_xcomposer.conversion.readers import open_checkpoint

SHARD1_BIN = "pytorch_model-00001-of-00002.bin"
SHARD1_ST = "model-00001-of-00002.safetensors"


def _copy(src, tmp_path):
    dst = str(tmp_path / "src")
    shutil.copytree(src, dst)
    return dst


def _run_convert(capsys, src, dst, *flags):
    rc = main(["convert", src, dst, "--quiet", *flags])
    return rc, capsys.readouterr().err


def _assert_nothing_left(dst):
    """DST absent, no temporary sibling, and a parent directory the run created is gone again."""
    assert not os.path.exists(dst)
    assert not os.path.exists(os.path.dirname(dst)), os.listdir(os.path.dirname(dst))


# ---- each builder returns (source dir, [substrings the error must contain]) ---------------------------------
def missing_index_entry(tmp_path):
    src = _copy(GOLDEN_ST, tmp_path)
    key = "model.layers.1.feed_forward.w3.weight"
    edit_json(os.path.join(src, "model.safetensors.index.json"), lambda d: d["weight_map"].pop(key))
    return src, ["model.safetensors.index.json", "not listed in the index", key]


def missing_shard_file(tmp_path):
    src = _copy(GOLDEN_BIN, tmp_path)
    os.remove(os.path.join(src, "pytorch_model-00002-of-00002.bin"))
    return src, ["pytorch_model.bin.index.json", "do not exist", "pytorch_model-00002-of-00002.bin", "e.g. for tensors"]


def truncated_bin(tmp_path):
    src = _copy(GOLDEN_BIN, tmp_path)
    truncate(os.path.join(src, SHARD1_BIN), 4_000_000)
    return src, [SHARD1_BIN, "truncated or corrupted"]


def truncated_safetensors(tmp_path):
    src = _copy(GOLDEN_ST, tmp_path)
    truncate(os.path.join(src, SHARD1_ST), 9_000_000)
    return src, [SHARD1_ST, "but the file has 9000000", "truncated or corrupted"]


def safetensors_cut_in_header(tmp_path):
    src = _copy(GOLDEN_ST, tmp_path)
    truncate(os.path.join(src, SHARD1_ST), 100)
    return src, [SHARD1_ST, "header claims", "truncated or corrupted"]


def corrupted_bin_storage(tmp_path):
    """A flipped byte inside tensor data: found by the zip CRC (checked by default) while streaming, mid-conversion."""
    src = _copy(GOLDEN_BIN, tmp_path)
    with open_checkpoint(src) as r:
        key = "model.layers.0.attention.wqkv.weight"
        info = r.info(key)
    flip_byte(info.file, info.offset + 1000)
    return src, [SHARD1_BIN, key, "CRC-32", "corrupted shard"]


def corrupted_bin_pickle(tmp_path):
    src = _copy(GOLDEN_BIN, tmp_path)
    with zipfile.ZipFile(os.path.join(src, SHARD1_BIN)) as zf:
        pkl = [m for m in zf.infolist() if m.filename.endswith("data.pkl")][0]
        start = pkl.header_offset + 30 + len(pkl.filename.encode()) + len(pkl.extra)
    flip_byte(os.path.join(src, SHARD1_BIN), start + 200)
    return src, [SHARD1_BIN, "CRC-32", "truncated or corrupted"]


def corrupted_safetensors_header(tmp_path):
    src = _copy(GOLDEN_ST, tmp_path)
    flip_byte(os.path.join(src, SHARD1_ST), 8 + 40)
    return src, [SHARD1_ST, "corrupted"]


def index_lists_absent_tensor(tmp_path):
    src = _copy(GOLDEN_BIN, tmp_path)
    edit_json(os.path.join(src, "pytorch_model.bin.index.json"),
              lambda d: d["weight_map"].update({"model.layers.0.attention.wo.Plora_C.weight": SHARD1_BIN}))
    return src, ["pytorch_model.bin.index.json", "model.layers.0.attention.wo.Plora_C.weight", SHARD1_BIN,
                 "does not contain it"]


def missing_required_keys(tmp_path):
    omit = ["model.layers.1.ffn_norm.weight", "vit.vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias"]
    src = tiny_hf_checkpoint(str(tmp_path / "src"), "tiny-ixc2.5", "safetensors", omit=omit)
    return src, ["2 required tensors are missing", *omit]


def unknown_keys(tmp_path):
    extra = {"model.layers.0.attention.wq.weight": np.zeros((4, 4), np.float32),
             "lm_head.weight": np.zeros((2, 2), np.float32)}
    src = tiny_hf_checkpoint(str(tmp_path / "src"), "tiny-ixc2-vl", "bin", extra_tensors=extra)
    return src, ["2 tensors are not parameters of this xcomposer2 model", *extra, "--keep-unknown"]


def shape_contradicts_config(tmp_path):
    bad = {"model.layers.1.feed_forward.w1.weight": np.zeros((500, 256), np.float32)}
    src = tiny_hf_checkpoint(str(tmp_path / "src"), "tiny-ixc2-4khd", "safetensors", extra_tensors=bad)
    return src, ["model.layers.1.feed_forward.w1.weight", "has shape [500, 256]", "expects [512, 256]", ".safetensors"]


def heads_contradict_config(tmp_path):
    """config.json says 8 heads of 32, the fused wqkv rows were made for 4 heads of 64 + 2x2 KV heads."""
    src = tiny_hf_checkpoint(str(tmp_path / "src"), "tiny-ixc2-vl", "bin")
    edit_json(os.path.join(src, "config.json"), lambda d: d.update(num_attention_heads=8))
    return src, ["model.layers.0.attention.wqkv.weight", "has shape [512, 256]", "expects [384, 256]"]


def non_finite(tmp_path):
    value = np.ones(256, np.float32)
    value[7] = np.nan
    src = tiny_hf_checkpoint(str(tmp_path / "src"), "tiny-ixc2-vl", "safetensors",
                             extra_tensors={"model.norm.weight": value})
    return src, ["model.norm.weight", "1 non-finite values", "flat index 7", "--check-finite"]


def no_config(tmp_path):
    src = _copy(GOLDEN_ST, tmp_path)
    os.remove(os.path.join(src, "config.json"))
    return src, ["config file", "config.json", "does not exist"]


def not_a_checkpoint(tmp_path):
    src = str(tmp_path / "empty")
    os.makedirs(src)
    return src, ["holds no checkpoint", "model.safetensors.index.json", "pytorch_model.bin"]


def no_tokenizer(tmp_path):
    src = _copy(GOLDEN_ST, tmp_path)
    os.remove(os.path.join(src, "tokenizer.model"))
    return src, [f"{src} has no tokenizer.model", "could not chat", "--allow-missing-tokenizer"]


FLAGS = {non_finite: ["--check-finite"]}
CASES = [missing_index_entry, missing_shard_file, truncated_bin, truncated_safetensors, safetensors_cut_in_header,
         corrupted_bin_storage, corrupted_bin_pickle, corrupted_safetensors_header, index_lists_absent_tensor,
         missing_required_keys, unknown_keys, shape_contradicts_config, heads_contradict_config, non_finite,
         no_config, not_a_checkpoint, no_tokenizer]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input(tmp_path, capsys, case):
    src, expected = case(tmp_path)
    dst = str(tmp_path / "out" / "ms")
    rc, err = _run_convert(capsys, src, dst, *FLAGS.get(case, []))
    assert rc == 2, err
    assert err.startswith("error: ")
    for text in expected:
        assert text in err, (text, err)
    _assert_nothing_left(dst)


def test_non_finite_without_the_flag_is_converted(tmp_path, capsys):
    src, _ = non_finite(tmp_path)
    dst = str(tmp_path / "ms")
    assert _run_convert(capsys, src, dst)[0] == 0
    with open_checkpoint(dst) as r:
        assert np.isnan(r.read("model.norm.weight")[7])


def test_corrupted_storage_with_no_check_crc(tmp_path, capsys):
    """With --no-check-crc the bytes are converted as they are (as torch.load would load them); `verify`
    reads with CRC checks and reports the corrupted shard."""
    src, expected = corrupted_bin_storage(tmp_path)
    dst = str(tmp_path / "ms")
    assert _run_convert(capsys, src, dst, "--no-check-crc")[0] == 0
    assert main(["verify", src, dst, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert all(t in err for t in expected), err


def test_cast_overflow_caught_by_check_finite(tmp_path, capsys):
    value = np.ones(256, np.float32)
    value[3] = 1e6  # finite in fp32, inf in fp16
    src = tiny_hf_checkpoint(str(tmp_path / "src"), "tiny-ixc2-vl", "safetensors", dtype="float32",
                             extra_tensors={"model.norm.weight": value})
    rc, err = _run_convert(capsys, src, str(tmp_path / "ms"), "--dtype", "float16", "--check-finite")
    assert rc == 2 and "model.norm.weight" in err and "after casting to float16" in err, err


def test_missing_tokenizer_allowed_with_flag(tmp_path, capsys):
    src, _ = no_tokenizer(tmp_path)
    dst = str(tmp_path / "ms")
    rc, err = _run_convert(capsys, src, dst, "--allow-missing-tokenizer")
    assert rc == 0, err
    assert err == f"warning: {src} has no tokenizer.model: none copied, so {dst} cannot chat until one is added\n"
    assert "tokenizer.model" not in os.listdir(dst) and "tokenizer_config.json" in os.listdir(dst)


def test_unknown_keys_kept_with_flag(tmp_path, capsys):
    src, _ = unknown_keys(tmp_path)
    dst = str(tmp_path / "ms")
    assert _run_convert(capsys, src, dst, "--keep-unknown")[0] == 0
    with open_checkpoint(dst) as r:
        assert "lm_head.weight" in r.keys()


# ---- pickles ------------------------------------------------------------------------------------------------
def _torch_zip_with_pickle(path, pkl: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", b"little")
        zf.writestr("archive/version", b"3\n")


def _payload(module: str, name: str, arg: str) -> bytes:
    """A protocol-2 pickle calling module.name(arg) when loaded by an unrestricted unpickler."""
    a = arg.encode()
    return (pickle.PROTO + b"\x02" + pickle.GLOBAL + f"{module}\n{name}\n".encode() + pickle.BINUNICODE
            + len(a).to_bytes(4, "little") + a + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)


@pytest.mark.parametrize("module,name", [("os", "system"), ("posix", "system"), ("builtins", "exec")])
def test_malicious_pickle_refused_and_not_executed(tmp_path, capsys, module, name):
    marker = tmp_path / "pwned"
    arg = f"touch {marker}" if name == "system" else f"open({str(marker)!r}, 'w').close()"
    pkl = _payload(module, name, arg)
    src = tiny_hf_checkpoint(str(tmp_path / "src"), "tiny-ixc2-vl", "bin", shards=1)
    _torch_zip_with_pickle(os.path.join(src, "pytorch_model.bin"), pkl)
    dst = str(tmp_path / "out" / "ms")
    rc, err = _run_convert(capsys, src, dst)
    assert rc == 2 and f"refusing to unpickle global {module}.{name}" in err and "pytorch_model.bin" in err, err
    with pytest.raises(UnsafePickleError, match=f"{module}.{name}"):
        open_checkpoint(src)
    assert not marker.exists()
    _assert_nothing_left(dst)
    pickle.loads(pkl)  # the crafted file is really dangerous: a plain unpickler runs it
    assert marker.exists()


def test_malicious_global_inside_a_valid_state_dict(tmp_path):
    """A state dict whose tensor record smuggles a call: still refused by name."""
    from ms_xcomposer.conversion.synthetic import _PickleWriter
    from ms_xcomposer.conversion.writers import TensorSpec

    good = _PickleWriter().state_dict([TensorSpec("w", "float32", (2,))])
    evil = good.replace(b"ctorch._utils\n_rebuild_tensor_v2\n", b"cbuiltins\neval\n")
    path = str(tmp_path / "x.bin")
    _torch_zip_with_pickle(path, evil)
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        open_checkpoint(path)


# ---- destination ----------------------------------------------------------------------------------------------
def test_destination_exists(tmp_path, capsys):
    dst = tmp_path / "ms"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    rc, err = _run_convert(capsys, GOLDEN_ST, str(dst))
    assert rc == 2 and "already exists" in err and "--overwrite" in err
    assert os.listdir(dst) == ["keep.txt"]
    os.remove(dst / "keep.txt")  # an empty directory may be replaced (see test_convert_safety for the rest)
    assert _run_convert(capsys, GOLDEN_ST, str(dst), "--overwrite")[0] == 0
    assert "mindspore_model.index.json" in os.listdir(dst)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".ms")] == []


def test_failed_overwrite_leaves_destination_intact(tmp_path, capsys):
    dst = str(tmp_path / "ms")
    convert(GOLDEN_ST, dst)
    before = tree_bytes(dst)
    src, _ = corrupted_bin_storage(tmp_path)  # fails mid-stream, after the temporary output was started
    rc, _ = _run_convert(capsys, src, dst, "--overwrite")
    assert rc == 2 and tree_bytes(dst) == before
    assert [n for n in os.listdir(tmp_path) if n.startswith(".ms")] == []


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_conversion(tmp_path, monkeypatch, existing):
    dst = str(tmp_path / "ms")
    if existing:
        convert(GOLDEN_BIN, dst)
    before = tree_bytes(dst) if existing else None
    calls = []
    real_add = writers.ShardSet.add

    def interrupting_add(self, spec, data):
        calls.append(spec.name)
        if len(calls) == 50:
            raise KeyboardInterrupt
        real_add(self, spec, data)

    monkeypatch.setattr(writers.ShardSet, "add", interrupting_add)
    with pytest.raises(KeyboardInterrupt):
        convert(GOLDEN_ST, dst, overwrite=True)
    assert len(calls) == 50
    if existing:
        assert tree_bytes(dst) == before
    else:
        assert not os.path.exists(dst)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".ms")] == []


def test_source_must_be_hf_and_not_the_destination(tmp_path):
    ms_dir = str(tmp_path / "ms")
    convert(GOLDEN_ST, ms_dir)
    with pytest.raises(CheckpointError, match="converted MindSpore checkpoint, not a Hugging Face"):
        convert(ms_dir, str(tmp_path / "again"))
    src = _copy(GOLDEN_ST, tmp_path)
    with pytest.raises(CheckpointError, match="overlaps the source"):
        convert(src, src, overwrite=True)
    assert json.load(open(os.path.join(src, "model.safetensors.index.json")))["weight_map"]
