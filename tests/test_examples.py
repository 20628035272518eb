"""Every script in examples/ runs on the tiny golden model (through its main(), in this process).

Judges: the golden output of the official PyTorch code (convert-and-chat), the library chat on the same inputs
(multi-image, batch captioning), and a tampered checkpoint that parity must reject at the right stage.
"""
import importlib.util
import json
import os
import shutil

import mindspore as ms
import pytest

from helpers_checkpoints import GOLDEN_BIN
from ms_xcomposer.conversion.readers import open_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "ixc25_tiny")
WIDE, SMALL = (os.path.join(DATA, f"image_{n}.png") for n in ("wide", "small"))
DEMO_IMAGE = os.path.join(ROOT, "ms_xcomposer", "assets", "demo.png")


def load_example(name):
    path = os.path.join(ROOT, "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def back_to_pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def test_convert_and_chat_gives_the_official_answer(tmp_path, capsys):
    with open(os.path.join(DATA, "golden.json"), encoding="utf-8") as f:
        g = json.load(f)["gen_greedy"]
    ms_dir = str(tmp_path / "ms")
    args = [GOLDEN_BIN, ms_dir, "--image", WIDE, "--query", g["query"], "--hd-num", "4",
            "--max-new-tokens", "12", "--repetition-penalty", "1.0"]
    assert load_example("convert_and_chat").main(args) == 0
    out = capsys.readouterr()
    assert out.out == g["response"] + "\n"
    assert out.err.startswith("converted 142 tensors")
    assert os.path.isfile(os.path.join(ms_dir, "mindspore_model.index.json"))


def test_multi_image_compare(converted, library, capsys):
    from ms_xcomposer import chat

    example = load_example("multi_image_compare")
    assert example.build_query(2, "Which is brighter?") == "Image1 <ImageHere>; Image2 <ImageHere>; Which is brighter?"
    args = [converted, SMALL, DEMO_IMAGE, "--question", "Which is brighter?", "--max-new-tokens", "2",
            "--repetition-penalty", "1.0"]
    assert example.main(args) == 0
    expected, _ = chat(*library, "Image1 <ImageHere>; Image2 <ImageHere>; Which is brighter?",
                       images=[SMALL, DEMO_IMAGE], do_sample=False, max_new_tokens=2, repetition_penalty=1.0)
    assert capsys.readouterr().out == expected + "\n"
    with pytest.raises(SystemExit) as e:
        example.main([converted, SMALL])
    assert e.value.code == 2


def test_batch_caption_with_progress_bar(tmp_path, converted, library, capsys):
    from ms_xcomposer import chat

    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(SMALL, folder / "b_small.png")
    shutil.copy(DEMO_IMAGE, folder / "a_demo.png")
    (folder / "c_broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("not an image")
    out_file = tmp_path / "captions.jsonl"
    args = [converted, str(folder), "--out", str(out_file), "--query", "Caption.", "--hd-num", "1",
            "--max-new-tokens", "2"]
    assert load_example("batch_caption").main(args) == 1  # one image failed
    err = capsys.readouterr().err
    assert "captioning" in err and "3/3" in err and "captioned 2 of 3 images" in err
    records = [json.loads(line) for line in out_file.read_text(encoding="utf-8").splitlines()]
    assert [r["image"] for r in records] == ["a_demo.png", "b_small.png", "c_broken.png"]
    for record, path in zip(records[:2], (DEMO_IMAGE, SMALL)):
        expected, _ = chat(*library, "Caption.", images=[path], hd_num=1, do_sample=False, max_new_tokens=2,
                           repetition_penalty=1.0)
        assert record == {"image": os.path.basename(record["image"]), "caption": expected}
    assert "c_broken.png" in records[2]["error"] and "not a readable image" in records[2]["error"]


def test_batch_caption_empty_folder(tmp_path, converted, capsys):
    assert load_example("batch_caption").main([converted, str(tmp_path)]) == 2
    assert "error: no images" in capsys.readouterr().err


def test_parity_check_passes_and_catches_a_tampered_weight(tmp_path, converted, capsys):
    example = load_example("parity_check")
    report = tmp_path / "parity.json"
    args = [GOLDEN_BIN, "--ms-dir", converted, "--image", SMALL, "--hd-num", "1", "--steps", "3",
            "--json", str(report)]
    assert example.main(args) == 0
    assert "parity OK (pynative mode)" in capsys.readouterr().out
    d = json.loads(report.read_text(encoding="utf-8"))
    assert d["passed"] and d["first_failure"] is None and d["inputs"]["image_tokens"] == 841

    tampered = str(tmp_path / "tampered")
    shutil.copytree(converted, tampered)
    with open_checkpoint(tampered) as r:
        info = r.info("model.layers.1.feed_forward.w2.weight")
    with open(info.file, "r+b") as f:
        f.seek(info.offset)
        f.write(b"\x00\x41" * 64)  # 64 bf16 weights become 8.0: decoder layer 1 goes wrong, nothing before it
    assert example.main([GOLDEN_BIN, "--ms-dir", tampered, "--steps", "2"]) == 1
    out = capsys.readouterr()
    assert "parity FAILED: first diverging stage 'layer 1'" in out.err
    assert "embeddings" in out.out and "layer 0" in out.out
