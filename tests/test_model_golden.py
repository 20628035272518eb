"""XComposer2ForCausalLM against the official PyTorch outputs of the golden IXC-2.5 case, in both modes.

Measured on the development machine (fp32 compute from the bf16 checkpoint, both modes identical):
text_logits 9.6e-5 max abs (1.07e-4 on an AMD EPYC without AVX-512; logits up to 19 in magnitude), img_embeds hd1 4.5e-6 / hd4 5.6e-6,
vit_out 4e-6, chat prefill last logits 5.7e-5, KV-cached decode vs full forward 8.4e-5.
"""
import numpy as np
import pytest
import mindspore as ms

from ms_xcomposer.models.xcomposer2 import XComposer2ForCausalLM
from tolerances import assert_close

DATA = "tests/data/ixc25_tiny"
MODES = ["pynative", "graph"]
FP32 = ("float32", "float32")


@pytest.fixture(scope="module")
def golden():
    return np.load(f"{DATA}/golden.npz")


@pytest.fixture(scope="module", params=MODES)
def model(request):
    """One model per mode; the .bin form is loaded in PyNative, the safetensors form in GRAPH mode."""
    mode = request.param
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    source = "hf" if mode == "pynative" else "hf_safetensors"
    yield XComposer2ForCausalLM.from_pretrained(f"{DATA}/{source}")
    ms.set_context(mode=ms.PYNATIVE_MODE)


def test_text_logits(model, golden):
    logits = model(input_ids=golden["text_ids"]).logits.asnumpy()
    assert_close(logits, golden["text_logits"], FP32, "text_logits")


@pytest.mark.parametrize("hd", [1, 4])
def test_img_embeds(model, golden, hd):
    embeds = model.encode_img(golden[f"pixels_wide_hd{hd}"]).asnumpy()
    assert embeds.shape == (1, int(golden[f"n_tokens_wide_hd{hd}"]), 256)
    assert_close(embeds, golden[f"img_embeds_wide_hd{hd}"], FP32, f"img_embeds_wide_hd{hd}")


def test_image_tokens_before_projector(model, golden):
    tokens = model.encode_img(golden["pixels_wide_hd1"], project=False).asnumpy()
    assert_close(tokens, golden["vit_out_wide_hd1"], FP32, "vit_out_wide_hd1")


def _chat_prefill_embeds(model, golden):
    image = model.encode_img(golden["pixels_wide_hd4"]).asnumpy()
    before = model.embed_tokens(golden["chat_part0_ids"][None]).asnumpy()
    after = model.embed_tokens(golden["chat_part1_ids"][None]).asnumpy()
    embeds = np.concatenate([before, image, after], axis=1)
    assert embeds.shape[1] == int(golden["chat_prefill_len"])
    return embeds


def test_chat_prefill_logits(model, golden):
    embeds = _chat_prefill_embeds(model, golden)
    out = model(inputs_embeds=embeds, im_mask=golden["chat_im_mask"], last_logits_only=True)
    assert out.logits.shape == (1, 1, 1000)
    assert_close(out.logits.asnumpy()[:, -1], golden["chat_prefill_logits_last"], FP32, "chat_prefill_logits")


def test_plora_changes_image_positions(model, golden):
    """The im_mask must matter: without it, the prefill logits move far from the golden ones."""
    embeds = _chat_prefill_embeds(model, golden)
    out = model(inputs_embeds=embeds, im_mask=None, last_logits_only=True)
    assert np.abs(out.logits.asnumpy()[:, -1] - golden["chat_prefill_logits_last"]).max() > 0.1


def test_kv_cache_steps_equal_full_forward(model, golden):
    """Prefill 30 tokens (with image rows in the mask), then 10 single-token steps with im_mask zero."""
    ids = golden["text_ids"]
    mask = np.zeros((1, 30), bool)
    mask[:, 5:12] = True
    full = model(input_ids=ids, im_mask=np.concatenate([mask, np.zeros((1, 10), bool)], 1)).logits.asnumpy()
    out = model(input_ids=ids[:, :30], im_mask=mask, use_cache=True)
    pieces, cache = [out.logits.asnumpy()], out.past_key_values
    assert cache.length == 30
    for i in range(30, 40):
        out = model(input_ids=ids[:, i:i + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        pieces.append(out.logits.asnumpy())
    assert cache.length == 40
    assert_close(np.concatenate(pieces, axis=1), full, FP32, "cached vs full logits")


def test_cache_growth_keeps_results(model, golden):
    """A cache that must grow past its capacity mid-sequence gives the same logits."""
    ids = golden["text_ids"]
    out = model(input_ids=ids[:, :20], use_cache=True, cache_capacity=20)
    assert out.past_key_values.capacity == 256
    cache = out.past_key_values
    grown = cache.grow(512)
    assert grown.capacity == 512 and grown.length == 20
    a = model(input_ids=ids[:, 20:40], past_key_values=cache, use_cache=True).logits.asnumpy()
    b = model(input_ids=ids[:, 20:40], past_key_values=grown, use_cache=True).logits.asnumpy()
    assert_close(a, b, FP32, "logits after cache growth")


def test_decode_compiles_once(golden):
    """GRAPH mode: one embedding graph, one prefill graph and one decode graph, whatever the prompt lengths and
    the number of steps (counted from MindSpore's own compile cache of every compiled piece)."""
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        model = XComposer2ForCausalLM.from_pretrained(f"{DATA}/hf_safetensors")
        ids = golden["text_ids"]
        for prompt_len in (7, 19, 26):  # three prefill lengths, all with image rows -> the same prefill graph
            mask = np.zeros((1, prompt_len), bool)
            mask[:, 1:4] = True
            out = model(input_ids=ids[:, :prompt_len], im_mask=mask, use_cache=True, last_logits_only=True)
            cache = out.past_key_values
            for i in range(prompt_len, prompt_len + 6):
                out = model(input_ids=ids[:, i:i + 1], past_key_values=cache, use_cache=True, last_logits_only=True)
                cache = out.past_key_values
        assert model.compiled_graphs() == 3
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_errors(model, golden):
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="im_mask has shape"):
        model(input_ids=golden["text_ids"], im_mask=np.zeros((1, 3), bool))
    with pytest.raises(ValueError, match="infer_mode 'draw' unknown"):
        model(input_ids=golden["text_ids"], infer_mode="draw")
    with pytest.raises(ValueError, match="do not split into 560x560 tiles"):
        model.encode_img(np.zeros((1, 3, 500, 560), np.float32))
