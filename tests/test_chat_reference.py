"""Chat parity with the independent PyTorch reference (`ms_xcomposer.reference`, transformers' `generate`) on tiny
random IXC2-VL / IXC2-4KHD / IXC-2.5 models: greedy, beam search, several images, history, text only, sampling.

Both sides load the same HF directory (random float32 weights); the MindSpore side loads it after conversion with
`ms_xcomposer.conversion.convert`. The reference builds its prompt from the pieces of `build_chat_prompt` (whose
strings and ids `test_prompt.py` checks against the official ones), its own `encode_img` and `interleave`.
"""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import save_file  # noqa: E402
from transformers.generation.logits_process import (  # noqa: E402
    RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
)

from conftest import MODES, mindspore_mode  # noqa: E402
from ms_xcomposer.models.xcomposer2.config import preset  # noqa: E402
from ms_xcomposer.conversion.convert import convert  # noqa: E402
from ms_xcomposer.conversion.synthetic import hf_config_dict  # noqa: E402
from ms_xcomposer.conversion.writers import copy_side_files  # noqa: E402
from ms_xcomposer.models.xcomposer2 import XComposer2ForCausalLM  # noqa: E402
from ms_xcomposer.models.xcomposer2.processor import Video, XComposer2Processor  # noqa: E402
from ms_xcomposer.models.xcomposer2.processing import ImageError, preprocess  # noqa: E402
from ms_xcomposer.models.xcomposer2.prompt import TextPiece, build_chat_prompt  # noqa: E402
from ms_xcomposer.reference import ReferenceXComposer2  # noqa: E402
from helpers_chat import DATA, EOS, SMALL, WIDE, RecordingModel, official_chat_with_ids  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{preset name: (reference model, MindSpore model, processor)}, built on first use, random weights."""
    root = tmp_path_factory.mktemp("tiny")
    built = {}

    def get(name):
        if name not in built:
            cfg = preset(name)
            hf = os.path.join(root, f"{name}-hf")
            os.makedirs(hf)
            state = ReferenceXComposer2.random_state_dict(cfg, seed=0)
            save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(hf, "model.safetensors"))
            with open(os.path.join(hf, "config.json"), "w", encoding="utf-8") as f:
                json.dump(hf_config_dict(cfg, "float32"), f)
            copy_side_files(os.path.join(DATA, "hf"), hf)
            converted = os.path.join(root, f"{name}-ms")
            convert(hf, converted)
            built[name] = (ReferenceXComposer2.from_pretrained(hf), XComposer2ForCausalLM.from_pretrained(converted),
                           XComposer2Processor.from_pretrained(converted))
        return built[name]

    return get


def reference_inputs(ref, proc, query, images, hd_num, history=(), use_meta=False):
    """Prompt embeddings on the reference side: pieces -> ids / reference image embeddings -> interleave."""
    spec = ref.xc.spec
    pieces = build_chat_prompt(query, history, spec, None if images is None else len(images), use_meta)
    parts = []
    for piece in pieces:
        if isinstance(piece, TextPiece):
            parts.append(proc.tokenizer.encode(piece.text, add_bos=piece.add_bos))
        else:
            pixels = preprocess(images[piece.index], spec, hd_num)
            parts.append(ref.encode_img(torch.from_numpy(pixels)))
    return ref.interleave(parts)


def reference_generate(ref, embeds, im_mask, **kwargs):
    with torch.no_grad():
        out = ref.generate(inputs_embeds=embeds, im_mask=im_mask, attention_mask=torch.ones(im_mask.shape),
                           eos_token_id=EOS, pad_token_id=2, **kwargs)
    return out[0].tolist()


@pytest.mark.parametrize("name,query,images,hd_num,beams,ref_hd", [
    ("tiny-ixc2-vl", "<ImageHere>Describe this image.", [SMALL], None, 1, 1),
    ("tiny-ixc2-4khd", "What is in <ImageHere>?", [WIDE], 2, 3, 2),
    ("tiny-ixc2.5", "Describe.", [SMALL], 2, 3, 2),
    # several images: IXC-2.5 uses hd_num 6 (the wide image becomes 2x2 tiles) whatever hd_num says
    ("tiny-ixc2.5", "Image1 <ImageHere>; Image2 <ImageHere>; compare them.", [WIDE, SMALL], 1, 1, 6),
])
def test_chat_matches_reference(tiny, name, query, images, hd_num, beams, ref_hd):
    ref, model, proc = tiny(name)
    embeds, im_mask = reference_inputs(ref, proc, query, images, ref_hd)
    expected = reference_generate(ref, embeds, im_mask, do_sample=False, num_beams=beams, max_new_tokens=10,
                                  repetition_penalty=1.005)
    with mindspore_mode("graph"):
        recorder = RecordingModel(model)
        result = official_chat_with_ids(recorder, proc, query, images, hd_num=hd_num, do_sample=False,
                                        num_beams=beams, max_new_tokens=10)
    assert recorder.calls[0]["seq"] == embeds.shape[1]
    np.testing.assert_array_equal(np.asarray(recorder.calls[0]["im_mask"]), im_mask.numpy())
    assert result.ids == expected
    assert result.response == proc.decode(expected)


def test_multi_turn_history_with_meta_matches_reference(tiny):
    ref, model, proc = tiny("tiny-ixc2.5")
    with mindspore_mode("graph"):
        first, history = model.chat(proc.tokenizer, "Describe.", image=[SMALL], do_sample=False, num_beams=1,
                                    max_new_tokens=6, use_meta=True)
        result = official_chat_with_ids(model, proc, "And the colours?", [SMALL], history=history, do_sample=False,
                                        num_beams=3, max_new_tokens=8, use_meta=True)
    assert history == [("Describe.", first)]
    embeds, im_mask = reference_inputs(ref, proc, "And the colours?", [SMALL], 24, history, use_meta=True)
    assert result.ids == reference_generate(ref, embeds, im_mask, do_sample=False, num_beams=3, max_new_tokens=8,
                                            repetition_penalty=1.005)
    assert result.history == history + [("And the colours?", result.response)]


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name,beams", [("tiny-ixc2-vl", 1), ("tiny-ixc2.5", 3)])
def test_text_only_chat_matches_reference(tiny, name, beams, mode):
    """No image: the official `build_inputs` path (prompt '<s>...' plus BOS: ids start [1, 1]), input ids, so
    the repetition penalty also counts the prompt's ids (a strong penalty makes that visible)."""
    ref, model, proc = tiny(name)
    pieces = build_chat_prompt("Hello, who are you?", [("Hi", "Hello!")], ref.xc.spec, None)
    ids = proc.tokenizer.encode(pieces[0].text, add_bos=True)
    assert ids[:2] == [1, 1]
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           do_sample=False, num_beams=beams, max_new_tokens=8, eos_token_id=EOS, pad_token_id=2,
                           repetition_penalty=1.3)
    expected = out[0, len(ids):].tolist()
    with mindspore_mode(mode):
        result = official_chat_with_ids(model, proc, "Hello, who are you?", None, history=[("Hi", "Hello!")],
                                        do_sample=False, num_beams=beams, max_new_tokens=8, repetition_penalty=1.3)
    assert result.ids == expected


def test_sampling_is_seeded_and_stays_in_the_reference_support(tiny):
    """Sampled tokens must lie in the top-k / top-p support of the reference's processed distribution."""
    ref, model, proc = tiny("tiny-ixc2.5")
    kwargs = dict(do_sample=True, temperature=0.7, top_p=0.8, repetition_penalty=1.005, max_new_tokens=8)
    with mindspore_mode("graph"):
        runs = {seed: official_chat_with_ids(model, proc, "Tell me a story.", [], seed=seed, **kwargs).ids
                for seed in (0, 1, 2)}
        again = official_chat_with_ids(model, proc, "Tell me a story.", [], seed=0, **kwargs).ids
    assert again == runs[0]
    assert len({tuple(v) for v in runs.values()}) > 1
    embeds, im_mask = reference_inputs(ref, proc, "Tell me a story.", [], None)
    processors = [RepetitionPenaltyLogitsProcessor(1.005), TemperatureLogitsWarper(0.7), TopKLogitsWarper(50),
                  TopPLogitsWarper(0.8)]
    for ids in runs.values():
        with torch.no_grad():
            full = torch.cat([embeds, ref.model.tok_embeddings(torch.tensor([ids[:-1]], dtype=torch.long))], 1)
            logits = ref(inputs_embeds=full, im_mask=torch.zeros(full.shape[:2], dtype=torch.bool)).logits[0]
        for step, token in enumerate(ids):
            scores = logits[embeds.shape[1] - 1 + step][None]
            prefix = torch.tensor([ids[:step]], dtype=torch.long)
            for p in processors:
                scores = p(prefix, scores)
            assert torch.isfinite(scores[0, token]), f"token {token} at step {step} is outside the support"


def test_video_is_refused_by_vl(tiny):
    _, model, proc = tiny("tiny-ixc2-vl")
    with pytest.raises(ImageError, match="does not take videos"):
        proc.prepare(model, "<ImageHere>Describe.", [Video([np.zeros((8, 8, 3), np.uint8)])])
