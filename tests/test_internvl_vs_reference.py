"""The MindSpore InternVL-1.5 family judged by the PyTorch reference (`ReferenceInternVL`, checked against the
golden case in test_internvl_reference.py) on what the golden case does not cover, in PyNative and GRAPH mode.

The checkpoint is a tiny random one in the real HF layout (tests/helpers_internvl.py): the InternViT-300M
flavour (LayerNorm + qkv bias, no q/k norm), 4 vision layers with select_layer -4, pixel shuffle v1, and an LLM
with dynamic NTK past max_position_embeddings 256 (the 294-row prompt of one tile is past it). Covered: pixels
of odd image sizes (1x1, 3000x200, 200x3000) and max_num 12 grids to 1e-6, their features, prompt logits with
NTK active, greedy and beam-search (3 beams) ids, sampling (seeded, inside the reference's support; the draws
themselves use different generators), fp16 and bf16 weight storage (the rows of tolerances.py).
"""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper  # noqa: E402

from conftest import MODES, mindspore_mode  # noqa: E402
from helpers_internvl import layernorm_v1_edit, write_hf_dir  # noqa: E402
from ms_xcomposer import load  # noqa: E402
from ms_xcomposer.generation import GenerationConfig, generate  # noqa: E402
from ms_xcomposer.models.internvl.modeling import InternVLChatModel  # noqa: E402
from ms_xcomposer.reference import ReferenceInternVL  # noqa: E402
from ms_xcomposer.reference.internvl import load_image as reference_load_image  # noqa: E402
from tolerances import assert_close, assert_judged  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "internvl15_tiny")
SMALL, WIDE = os.path.join(DATA, "image_small.png"), os.path.join(DATA, "image_wide.png")
QUERY = "Describe this image."
FP32 = ("float32", "float32")
EOS = [92542, 2]  # <|im_end|>, </s>: the library chat's stop ids


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_hf_dir(str(tmp_path_factory.mktemp("internvl") / "ln"), layernorm_v1_edit(256))


@pytest.fixture(scope="module")
def ref(hf_dir):
    return ReferenceInternVL.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def loaded(hf_dir):
    """{mode: (model, processor)}, loaded on first use (GRAPH compiles once per module)."""
    models = {}

    def get(mode):
        if mode not in models:
            with mindspore_mode(mode):
                models[mode] = load(hf_dir)
        return models[mode]

    return get


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    """{name: (path, max_num)}: random RGB images of odd sizes, and the wide golden image at max_num 12."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    images = {}
    for w, h in ((1, 1), (3000, 200), (200, 3000)):
        path = str(root / f"{w}x{h}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        images[f"{w}x{h}"] = (path, 12 if w == 3000 else 6)
    images["wide max 12"] = (WIDE, 12)
    return images


def ms_prompt(model, processor, image=SMALL):
    inputs = processor.prepare(model, QUERY, [image] if image else None)
    return inputs, inputs.inputs_embeds


def ref_prompt(ref, processor, inputs, image=SMALL):
    vit = ref.extract_feature(reference_load_image(image, 6)) if image else None
    return ref.splice(inputs.input_ids, vit, processor.img_context_token_id)


def test_config_is_what_the_golden_case_lacks(loaded):
    model, _ = loaded("pynative")
    cfg = model.config
    assert (cfg.vision.norm_type, cfg.vision.qkv_bias, cfg.vision.qk_normalization) == ("layer_norm", True, False)
    assert (cfg.select_layer, cfg.ps_version, cfg.vision_layers_used) == (-4, "v1", 1)
    assert cfg.llm.max_position_embeddings == 256 and cfg.llm.rope_scaling == {"type": "dynamic", "factor": 2.0}


def test_pixels_of_odd_sizes_and_12_tile_grids(loaded, odd_images):
    _, processor = loaded("pynative")
    tiles = {}
    for name, (path, max_num) in odd_images.items():
        ours, theirs = processor.load_image(path, max_num), reference_load_image(path, max_num).numpy()
        assert ours.shape == theirs.shape, name
        assert float(np.abs(ours - theirs).max()) <= 1e-6, name
        tiles[name] = ours.shape[0]
    # 1x1: one tile; 3000x200 at max 12: a 12x1 grid + thumbnail; 200x3000: 1x6 + thumbnail; 640x480: 4x3 + 1
    assert tiles == {"1x1": 1, "3000x200": 13, "200x3000": 7, "wide max 12": 13}


@pytest.fixture(scope="module")
def odd_features(loaded, ref, odd_images):
    """{name: (pixels, the reference's vit_embeds)} of the odd sizes (the 12-tile grid of 3000x200 included)."""
    _, processor = loaded("pynative")
    out = {}
    for name in ("1x1", "3000x200", "200x3000"):
        pixels = processor.load_image(*odd_images[name])
        out[name] = pixels, ref.extract_feature(pixels)
    return out


@pytest.mark.parametrize("mode", sorted(MODES))
def test_features_of_odd_sizes(loaded, odd_features, mode):
    model, _ = loaded(mode)
    for name, (pixels, expected) in odd_features.items():
        with mindspore_mode(mode):
            ours = model.extract_feature(pixels)
        assert_close(ours, expected, FP32, f"vit_embeds {name} ({mode})")


@pytest.mark.parametrize("mode", sorted(MODES))
def test_prompt_logits_with_dynamic_ntk(loaded, ref, mode):
    model, processor = loaded(mode)
    with mindspore_mode(mode):
        inputs, embeds = ms_prompt(model, processor)
        logits = model(inputs_embeds=embeds).logits
    assert len(inputs.input_ids) == 294 > model.config.llm.max_position_embeddings
    pt_embeds = ref_prompt(ref, processor, inputs)
    with torch.no_grad():
        expected = ref.language_model(inputs_embeds=pt_embeds).logits
    assert_close(logits, expected, FP32, f"prompt logits, NTK active ({mode})")
    if mode == "pynative":  # NTK really changes them: the same weights without scaling are far off
        import dataclasses

        plain = dataclasses.replace(ref.config, llm=dataclasses.replace(ref.config.llm, rope_scaling=None))
        unscaled = ReferenceInternVL.from_pretrained(ref.state_dict(), plain)
        with torch.no_grad():
            other = unscaled.language_model(inputs_embeds=pt_embeds).logits
        assert float((other - expected).abs().max()) > 1e-2


@pytest.mark.parametrize("mode", sorted(MODES))
def test_greedy_and_beam_search_ids(loaded, ref, mode):
    model, processor = loaded(mode)
    with mindspore_mode(mode):
        inputs, embeds = ms_prompt(model, processor)
        ours = {beams: generate(model, embeds, GenerationConfig(max_new_tokens=8, num_beams=beams,
                                                                eos_token_id=tuple(EOS))).ids for beams in (1, 3)}
        official = model.chat(processor.tokenizer, processor.load_image(SMALL), QUERY,
                              dict(num_beams=3, max_new_tokens=8, do_sample=False))
    pt_embeds = ref_prompt(ref, processor, inputs)
    for beams in (1, 3):
        expected = ref.generate(pt_embeds, do_sample=False, num_beams=beams, max_new_tokens=8, eos_token_id=EOS,
                                pad_token_id=2)[0]
        assert ours[beams] == expected, f"num_beams {beams} ({mode})"
    assert ours[1] != ours[3]  # the beams found another sequence: beam search was exercised
    assert official == processor.decode(ours[3])  # chat stops at <|im_end|> only; no </s> in 8 steps here


def test_sampling_is_seeded_and_inside_the_reference_support(loaded, ref):
    model, processor = loaded("graph")
    cfg = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.7, top_p=0.8, eos_token_id=tuple(EOS))
    with mindspore_mode("graph"):
        inputs, embeds = ms_prompt(model, processor)
        runs = {seed: generate(model, embeds, cfg.updated(seed=seed)).ids for seed in (0, 1, 2)}
        again = generate(model, embeds, cfg.updated(seed=0)).ids
    assert again == runs[0] and len({tuple(v) for v in runs.values()}) > 1
    pt_embeds = ref_prompt(ref, processor, inputs)
    lm = ref.language_model
    warpers = [TemperatureLogitsWarper(0.7), TopPLogitsWarper(0.8)]
    for ids in runs.values():
        # step by step with a cache, as decoding runs: with NTK active, a one-pass forward of prompt + ids would
        # rotate every position with the base of the final length
        with torch.no_grad():
            out = lm(inputs_embeds=pt_embeds, use_cache=True)
            steps = [out.logits[0, -1]]
            for token in ids[:-1]:
                out = lm(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
                steps.append(out.logits[0, -1])
        for step, token in enumerate(ids):
            scores = steps[step][None]
            for w in warpers:
                scores = w(torch.tensor([ids[:step]], dtype=torch.long), scores)
            assert torch.isfinite(scores[0, token]), f"token {token} at step {step} is outside the support"


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """The same checkpoint stored in bfloat16 (written once for both modes)."""
    return write_hf_dir(str(tmp_path_factory.mktemp("bf16")), layernorm_v1_edit(256), dtype="bfloat16")


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("storage", ["bfloat16", "float16"])
def test_half_precision_storage(hf_dir, bf16_dir, ref, storage, mode):
    """bf16-stored checkpoint (CPU upcasts it once at load: fp32 compute) and fp16 weights with fp16 compute,
    against the float32 reference on the same rounded weights, under the table's rows for those dtypes: vit_embeds,
    each decoder layer and (bf16) the logits.

    fp16 logits: PyTorch's own fp16 run of this model is 8.4e-2 from its fp32 run at logits of RMS 3 (1.1x the
    fp16 row; the row was measured on models with smaller logits), MindSpore 8.7e-2. They are judged as
    `ms-xcomposer parity` judges a stage that misses its row (`tolerances.judge`): against the reference in
    float64, no further from it than FLOAT64_FACTOR x the reference's own fp16 run (measured: MindSpore 8.74e-2,
    PyTorch fp16 8.44e-2 from float64: ill-conditioned, 1.03x).
    """
    from ms_xcomposer.models.internvl.processor import InternVLProcessor
    from ms_xcomposer.parity import call_with_layer_outputs

    if storage == "bfloat16":
        path, key, kwargs = bf16_dir, ("bfloat16", "float32"), {}
    else:
        path, key, kwargs = hf_dir, ("float16", "float16"), dict(dtype="float16", compute_dtype="float16")
    rounded = {k: v.to(getattr(torch, storage)).float() for k, v in ref.state_dict().items()}
    rounded_ref = ReferenceInternVL.from_pretrained(rounded, ref.config)  # the weights MindSpore holds
    with mindspore_mode(mode):
        model = InternVLChatModel.from_pretrained(path, **kwargs)
        processor = InternVLProcessor.from_pretrained(path, model.config)
        inputs, embeds = ms_prompt(model, processor)
        vit = model.extract_feature(processor.load_image(SMALL))
        out = model(inputs_embeds=embeds, output_hidden_states=True)
    assert_close(vit.float(), rounded_ref.extract_feature(processor.load_image(SMALL)), key, f"vit_embeds {storage} ({mode})")
    pt_embeds = torch.from_numpy(embeds.float().asnumpy())  # the same input: each decoder layer on its own
    lm = rounded_ref.language_model
    layers, expected = call_with_layer_outputs(lm.model.layers, lambda: lm(inputs_embeds=pt_embeds))
    for i, (ours, theirs) in enumerate(zip(out.hidden_states[1:], layers)):
        assert_close(ours.float(), theirs, key, f"layer {i} {storage} ({mode})")
    logits = out.logits.float().asnumpy()
    if storage == "bfloat16":
        assert_close(logits, expected.logits, key, f"prompt logits {storage} ({mode})")
        return
    runs = {}
    for dtype in (torch.float64, torch.float16):
        lm = ReferenceInternVL.from_pretrained(rounded, ref.config, dtype=dtype).language_model
        with torch.no_grad():
            runs[dtype] = lm(inputs_embeds=pt_embeds.to(dtype)).logits.double().numpy()
    assert_judged(logits, expected.logits, key, f"prompt logits {storage} ({mode})", exact=runs[torch.float64],
                  reference=runs[torch.float16])
