"""End-to-end chat on the official IXC-2.5 golden case (PyNative and GRAPH), streaming, videos, input errors.

The model is loaded from the golden HF checkpoint after conversion with `ms_xcomposer.conversion.convert`.
Parity with the PyTorch reference on the other variants is in `test_chat_reference.py`.
"""
import os

import numpy as np
import pytest

from conftest import MODES, mindspore_mode
from ms_xcomposer.conversation import IncrementalDecoder, chat, chat_with_ids, image_list, prepare_turn, stream_chat
from ms_xcomposer.models.xcomposer2.processor import Video, XComposer2Processor
from ms_xcomposer.conversion.convert import convert
from ms_xcomposer.models.xcomposer2 import XComposer2ForCausalLM
from ms_xcomposer.models.xcomposer2.processing import preprocess_video
from ms_xcomposer.models.xcomposer2.prompt import PromptError
from helpers_chat import DATA, EOS, SMALL, WIDE, RecordingModel
from ms_xcomposer.tokenizer import InternLM2Tokenizer


# ---- golden: the official IXC-2.5 chat --------------------------------------------------------------------
@pytest.fixture(scope="module")
def golden():
    with np.load(os.path.join(DATA, "golden.npz")) as g:
        return {k: g[k] for k in g.files}


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
    dst = os.path.join(tmp_path_factory.mktemp("golden"), "ms")
    convert(os.path.join(DATA, "hf"), dst)
    return dst


@pytest.fixture(scope="module")
def golden_tok(converted_dir):
    return InternLM2Tokenizer.from_pretrained(converted_dir)  # the converter copies the tokenizer files


@pytest.fixture(scope="module")
def golden_proc(converted_dir):
    return XComposer2Processor.from_pretrained(converted_dir)


@pytest.fixture(scope="module")
def golden_models(converted_dir):
    return {}  # one model per mode, built on first use


def golden_model(golden_models, converted_dir, mode):
    if mode not in golden_models:
        golden_models[mode] = XComposer2ForCausalLM.from_pretrained(converted_dir)
    return golden_models[mode]


@pytest.fixture(scope="module", params=sorted(MODES))
def golden_chat(request, golden_models, converted_dir, golden_proc):
    """The golden greedy chat, run once per mode, with the calls the generation made."""
    with mindspore_mode(request.param):
        model = RecordingModel(golden_model(golden_models, converted_dir, request.param))
        result = chat_with_ids(model, golden_proc, "Describe this image.", images=[WIDE], hd_num=4, do_sample=False,
                               num_beams=1, repetition_penalty=1.0, max_new_tokens=12)
    return result, model.calls


def test_golden_chat_ids_and_response(golden_chat, golden):
    result, _ = golden_chat
    assert result.ids == golden["gen_greedy_ids"].tolist()
    assert result.response == str(golden["gen_greedy_response"])
    assert result.history == [("Describe this image.", str(golden["gen_greedy_response"]))]


def test_golden_chat_prefill(golden_chat, golden):
    _, calls = golden_chat
    prefill = calls[0]
    assert prefill["seq"] == int(golden["chat_prefill_len"])
    np.testing.assert_array_equal(np.asarray(prefill["im_mask"]), golden["chat_im_mask"].astype(bool))
    diff = float(np.abs(prefill["logits"][:, -1] - golden["chat_prefill_logits_last"]).max())
    print(f"chat_prefill_logits_last max abs diff {diff:.3g}")
    assert diff <= 1e-4
    assert [c["seq"] for c in calls[1:]] == [1] * 11  # then 11 cached single-token decode steps


def test_golden_stream_chat(golden_models, converted_dir, golden_proc, golden):
    with mindspore_mode("graph"):
        model = golden_model(golden_models, converted_dir, "graph")
        stream = stream_chat(model, golden_proc, "Describe this image.", images=[WIDE], hd_num=4, do_sample=False,
                             repetition_penalty=1.0, max_new_tokens=12)
        pieces = list(stream)
    assert "".join(pieces) == str(golden["gen_greedy_response"])
    assert len(pieces) > 5  # text came out as it was generated, not at the end
    assert stream.result.ids == golden["gen_greedy_ids"].tolist()
    assert stream.result.response == str(golden["gen_greedy_response"])


def test_golden_prompt_cut_to_max_length(golden_models, converted_dir, golden_proc, golden):
    with mindspore_mode("graph"):
        model = golden_model(golden_models, converted_dir, "graph")
        with pytest.warns(UserWarning, match="exceeds max_length=2000 embedding rows"):
            inputs = golden_proc.prepare(model, "Describe this image.", [WIDE], hd_num=4, max_length=2000)
    assert inputs.inputs_embeds.shape == (1, 2000, 256)
    np.testing.assert_array_equal(inputs.im_mask, golden["chat_im_mask"][:, :2000].astype(bool))
    assert inputs.piece_ids[0] == [1]


# ---- incremental detokenization ------------------------------------------------------------------------------
def stream_pieces(proc, ids, chunk=1):
    decoder = IncrementalDecoder(proc)
    pieces = [decoder.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    return [p for p in pieces + [decoder.finish()] if p]


def test_incremental_decoding_of_golden_ids(golden_proc, golden):
    ids = golden["gen_greedy_ids"].tolist()
    pieces = stream_pieces(golden_proc, ids)
    assert "".join(pieces) == str(golden["gen_greedy_response"])
    assert len(pieces) > 5


def test_incremental_decoding_holds_back_partial_characters_and_clean_up(golden_proc):
    tok = golden_proc.tokenizer
    text = "你好 do n't stop . Done ? [UNUSED_TOKEN_145] after"
    ids = tok.encode(text, add_bos=False)
    assert any(tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids)  # byte-fallback pieces present
    pieces = stream_pieces(golden_proc, ids)
    assert "".join(pieces) == golden_proc.decode(ids) == "你好 don't stop. Done? "
    assert all("\ufffd" not in p for p in pieces)  # never half a UTF-8 character
    assert all("UNUSED" not in p for p in pieces)


@pytest.mark.parametrize("seed", range(4))
def test_incremental_decoding_of_random_ids_equals_the_response(golden_tok, golden_proc, seed):
    rng = np.random.default_rng(seed)
    # random pieces, weighted towards byte pieces, spaces, punctuation and the stop piece
    favourites = golden_tok.encode(" . , ? ! ' n't 's", add_bos=False) + [4, 1, 2] + list(range(3, 270))
    ids = [int(rng.choice(favourites)) if rng.random() < 0.6 else int(rng.integers(0, 1006)) for _ in range(300)]
    for chunk in (1, 3):
        assert "".join(stream_pieces(golden_proc, ids, chunk)) == golden_proc.decode(ids)


# ---- images, videos, errors ------------------------------------------------------------------------------------
def test_video_frames_become_one_canvas_image(golden_models, converted_dir, golden_proc):
    model = golden_model(golden_models, converted_dir, "graph")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (90, 120, 3), dtype=np.uint8) for _ in range(3)]
    pixels = preprocess_video(frames, "ixc2.5")
    with mindspore_mode("graph"):
        inputs = golden_proc.prepare(model, "Describe the video.", [Video(frames)])
        direct = model.encode_img(pixels).asnumpy()
    rows = int(inputs.im_mask.sum())
    h, w = pixels.shape[2] // 560, pixels.shape[3] // 560
    assert rows == model.config.image_tokens(h, w) == direct.shape[1]
    assert inputs.im_mask[0, 1:1 + rows].all()  # BOS, then the canvas, then the text
    np.testing.assert_allclose(inputs.inputs_embeds.asnumpy()[:, 1:1 + rows], direct, atol=1e-6)


def test_image_given_as_path_pil_array_or_alone_is_the_same(golden_models, converted_dir, golden_proc, golden):
    from PIL import Image

    model = golden_model(golden_models, converted_dir, "graph")
    pil = Image.open(WIDE).convert("RGB")
    with mindspore_mode("graph"):
        turns = [prepare_turn(model, golden_proc, "Describe this image.", image_list(image), (), hd_num=4)
                 for image in ([WIDE], WIDE, pil, [np.asarray(pil)])]
        embeds = [t.inputs.inputs_embeds.asnumpy() for t in turns]
    assert embeds[0].shape == (1, int(golden["chat_prefill_len"]), 256)
    for other in embeds[1:]:
        np.testing.assert_array_equal(other, embeds[0])


def test_chat_input_errors(golden_models, converted_dir, golden_proc):
    model = golden_model(golden_models, converted_dir, "graph")
    with pytest.raises(PromptError, match=r"1 <ImageHere> placeholder\(s\) but 2 image\(s\)"):
        chat(model, golden_proc, "<ImageHere> compare", images=[WIDE, SMALL])
    with pytest.raises(FileNotFoundError, match="no_such.png"):
        chat(model, golden_proc, "Describe.", images="no_such.png")
    with pytest.raises(PromptError, match="history must be a list"):
        stream_chat(model, golden_proc, "Describe.", images=[WIDE], history="oops")


def test_stream_errors_and_close(golden_models, converted_dir, golden_proc):
    model = golden_model(golden_models, converted_dir, "graph")
    with mindspore_mode("graph"):
        with pytest.raises(ValueError, match="infer_mode 'bogus' unknown"):  # raised by the call, before any work
            stream_chat(model, golden_proc, "Hi", infer_mode="bogus", max_new_tokens=4)
        with pytest.raises(TypeError, match=r"unknown XComposer2 chat options \['hd_nmu'\]"):
            stream_chat(model, golden_proc, "Hi", hd_nmu=4)
        recorder = RecordingModel(model)
        with stream_chat(recorder, golden_proc, "Hi", do_sample=True, top_k=0, top_p=1.0, seed=0,
                         max_new_tokens=200) as stream:
            first = next(stream, None)
        calls = len(recorder.calls)
    assert first is not None  # with top-k 0 and top-p 1 on a random model, text comes before the stop ids
    assert stream.result is None  # closed early: no result
    assert calls < 50 and len(recorder.calls) == calls  # generation stopped and stays stopped


def test_chat_eos_ids(golden_proc):
    assert list(golden_proc.eos_token_ids) == EOS
