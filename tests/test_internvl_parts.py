"""InternVL-1.5 building blocks against the golden case (official v1.5.1 code on a tiny random model).

Golden `tests/data/internvl15_tiny` (see its CASE.md) covers the RMSNorm + q/k-norm flavour (InternViT-6B),
ps_version v2, select_layer -1 and max_num 6. What it does not cover is judged by transformers' own PyTorch
`InternVLVisionModel` (4.57.1, an independent implementation with other key names), itself first checked
against the golden case: the LayerNorm + qkv-bias flavour (InternViT-300M), earlier select_layer values and
non-448 inputs (position-grid interpolation).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import mindspore as ms
import torch

from ms_xcomposer.config import ConfigError
from ms_xcomposer.conversion.readers import open_checkpoint
from ms_xcomposer.models.internvl.config import InternViTConfig, InternVLConfig
from ms_xcomposer.models.internvl.encoder import ImageEncoder
from ms_xcomposer.models.internvl.processing import choose_grid, load_image, target_ratios
from ms_xcomposer.models.internvl.projector import MLP1, pixel_shuffle, vit_tokens
from ms_xcomposer.models.internvl.prompt import (IMG_CONTEXT_TOKEN, PromptError, chat_prompt, get_template,
                                                 multi_image_chat_prompt)
from ms_xcomposer.models.internvl.vision import InternVisionModel
from ms_xcomposer.tokenizer import InternLM2Tokenizer
from ms_xcomposer.weights import DictSource, load_weights
from tolerances import assert_close

DATA = os.path.join(os.path.dirname(__file__), "data", "internvl15_tiny")
HF = os.path.join(DATA, "hf")
FP32 = ("float32", "float32")


@pytest.fixture(scope="module")
def golden():
    return np.load(os.path.join(DATA, "golden.npz"))


@pytest.fixture(scope="module")
def golden_json():
    with open(os.path.join(DATA, "golden.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def config() -> InternVLConfig:
    return InternVLConfig.from_file(HF)


@pytest.fixture(scope="module")
def image_weights():
    """{key: array} of every non-LLM tensor of the golden checkpoint (vision_model.*, mlp1.*)."""
    with open_checkpoint(HF) as r:
        return {k: r.read(k) for k in r.keys() if not k.startswith("language_model.")}


def _strip(tensors, prefix):
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def encoder(config, image_weights) -> ImageEncoder:
    enc = ImageEncoder(config)
    load_weights(enc, DictSource(image_weights, HF))  # every key must match: names = HF keys
    return enc


# ---- preprocessing ------------------------------------------------------------------------------------------
def test_pixels_equal_golden(golden, golden_json):
    pixels = load_image(os.path.join(DATA, "image_wide.png"), max_num=6)
    expected = golden["pixel_values_wide_max6"]
    assert pixels.dtype == np.float32 and pixels.shape == expected.shape == (7, 3, 448, 448)
    assert float(np.max(np.abs(pixels - expected))) <= 1e-6
    meta = golden_json["preprocess"]["pixel_values_wide_max6"]
    assert list(choose_grid(640, 480, 1, 6)) == meta["grid_cols_rows"]


def test_target_ratio_order(golden_json):
    """Equal-area grids keep the official set's order (golden.json for 6; REFERENCE_INTERNVL.md for 12)."""
    order6 = golden_json["preprocess"]["pixel_values_wide_max6"]["target_ratios_order"]
    assert target_ratios(1, 6) == [tuple(r) for r in order6]
    assert target_ratios(1, 12) == [
        (1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6), (6, 1), (3, 2),
        (2, 3), (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3), (9, 1), (2, 5), (5, 2), (10, 1),
        (1, 10), (11, 1), (1, 11), (12, 1), (3, 4), (4, 3), (1, 12), (6, 2), (2, 6)]


@pytest.mark.parametrize("size, grid6, grid12", [
    # measured on the official code (REFERENCE_INTERNVL.md section 6); 896x896 and 1080x1920 are area ties
    ((640, 480), (3, 2), (4, 3)), ((300, 800), (1, 3), (2, 5)), ((100, 100), (1, 1), (1, 1)),
    ((600, 600), (1, 1), (1, 1)), ((896, 896), (2, 2), (2, 2)), ((1920, 1080), (2, 1), (4, 2)),
    ((1080, 1920), (1, 2), (2, 4)), ((700, 1400), (1, 2), (2, 4)), ((3000, 1000), (3, 1), (6, 2)),
    ((1000, 200), (5, 1), (5, 1)),
])
def test_grid_choice_and_tie_rule(size, grid6, grid12):
    assert choose_grid(*size, 1, 6) == grid6
    assert choose_grid(*size, 1, 12) == grid12


def test_tile_counts_and_thumbnail():
    tall = load_image(os.path.join(DATA, "image_tall.png"), max_num=6)  # 1x3 grid + thumbnail
    small = load_image(os.path.join(DATA, "image_small.png"), max_num=6)  # 1x1: no thumbnail
    assert tall.shape == (4, 3, 448, 448) and small.shape == (1, 3, 448, 448)
    # the thumbnail (last tile) is the whole original image squashed to 448x448, not a grid tile
    single = load_image(os.path.join(DATA, "image_tall.png"), max_num=1)
    assert np.array_equal(tall[-1], single[0])
    assert not np.array_equal(tall[-1], tall[0])


# ---- config -------------------------------------------------------------------------------------------------
def test_config_from_golden(config):
    v = config.vision
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (64, 2, 4, 128)
    assert (v.norm_type, v.qk_normalization, v.qkv_bias, v.layer_norm_eps) == ("rms_norm", True, False, 1e-6)
    assert (config.select_layer, config.ps_version, config.template) == (-1, "v2", "internlm2-chat")
    assert (config.num_image_token, config.projector_in, config.max_dynamic_patch) == (256, 256, 12)
    llm = config.llm
    assert (llm.hidden_size, llm.num_key_value_heads, llm.vocab_size, llm.rope_theta) == (64, 2, 92553, 1e6)
    assert llm.rope_scaling == {"type": "dynamic", "factor": 2.0}
    assert InternVLConfig.from_dict(config.to_dict()) == config


def _hf_config():
    with open(os.path.join(HF, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def test_config_missing_fields_take_official_defaults():
    d = _hf_config()
    for name in ("ps_version", "select_layer", "use_thumbnail", "max_dynamic_patch"):
        del d[name]
    d["vision_config"]["num_hidden_layers"] = 4  # -4 needs at least 3 layers (hidden states -5..4)
    cfg = InternVLConfig.from_hf(d)
    assert (cfg.ps_version, cfg.select_layer, cfg.use_thumbnail, cfg.max_dynamic_patch) == ("v1", -4, False, 6)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(architectures=["LlavaForCausalLM"]), "architectures"),
    (lambda d: d.pop("vision_config"), "vision_config"),
    (lambda d: d["vision_config"].update(norm_type="batch_norm"), "norm_type"),
    (lambda d: d["vision_config"].update(hidden_size="64"), "vision_config.hidden_size"),
    (lambda d: d["llm_config"].update(architectures=["Phi3ForCausalLM"]), "llm_config.architectures"),
    (lambda d: d["llm_config"].pop("bias"), "llm_config.bias"),
    (lambda d: d.update(ps_version="v3"), "ps_version"),
    (lambda d: d.update(template="vicuna_v1.1"), "template"),
    (lambda d: d.update(select_layer=-9), "select_layer"),
])
def test_config_errors_name_file_and_field(edit, message):
    d = _hf_config()
    edit(d)
    with pytest.raises(ConfigError, match=message) as e:
        InternVLConfig.from_hf(d, "some/config.json")
    assert str(e.value).startswith("some/config.json") and "\n" not in str(e.value)


# ---- vision, projector: golden ------------------------------------------------------------------------------
def test_image_encoder_matches_golden(ms_mode, encoder, golden):
    """Every stage of the official extract_feature: embeddings, last hidden state, shuffled tokens, mlp1."""
    pixels = ms.Tensor(golden["pixel_values_wide_max6"])
    hidden, states = encoder.vision_model(pixels, None, True)
    assert_close(states[0][0], golden["vit_embeddings_out_wide_tile0"], FP32, f"embeddings ({ms_mode})")
    assert_close(hidden, golden["vit_last_hidden_wide"], FP32, f"vit last hidden ({ms_mode})")
    assert_close(vit_tokens(hidden.asnumpy()), golden["vit_shuffled_wide"], FP32, f"pixel shuffle ({ms_mode})")
    assert_close(encoder(pixels), golden["vit_embeds_wide"], FP32, f"vit_embeds ({ms_mode})")


def test_image_encoder_fp16_compute(ms_mode, encoder, golden):
    """fp32 weights, fp16 activations (weights cast per call) vs the fp32 golden: within fp16's bounds."""
    out = encoder(ms.Tensor(golden["pixel_values_wide_max6"]).astype(ms.float16))
    assert out.dtype == ms.float16
    assert_close(out.astype(ms.float32), golden["vit_embeds_wide"], ("float32", "float16"), f"fp16 ({ms_mode})")


def test_mlp1_alone_matches_golden(ms_mode, config, image_weights, golden):
    mlp1 = MLP1(config.projector_in, config.llm.hidden_size)
    load_weights(mlp1, DictSource(_strip(image_weights, "mlp1."), HF))
    assert_close(mlp1(ms.Tensor(golden["vit_shuffled_wide"])), golden["vit_embeds_wide"], FP32, f"mlp1 ({ms_mode})")


@pytest.mark.parametrize("as_tensor", [False, True])
def test_pixel_shuffle_toy(golden, as_tensor):
    """The labelled toy tensor of the golden case: exact permutations for v1 and v2."""
    x = golden["pixel_shuffle_toy_in"]
    for version in ("v1", "v2"):
        y = pixel_shuffle(ms.Tensor(x) if as_tensor else x, 0.5, version)
        y = y.asnumpy() if as_tensor else y
        assert np.array_equal(y, golden[f"pixel_shuffle_toy_{version}"]), version
    assert not np.array_equal(golden["pixel_shuffle_toy_v1"], golden["pixel_shuffle_toy_v2"])


def test_select_layer_gives_that_hidden_state(config, image_weights, golden):
    """select_layer -3 of a 2-layer tower = HF hidden_states[0] = the embeddings output (golden)."""
    vision = InternVisionModel(config.vision, select_layer=-3)
    load_weights(vision, DictSource(_strip(image_weights, "vision_model."), HF))
    out = vision(ms.Tensor(golden["pixel_values_wide_max6"][:1]))
    assert out.shape == (1, 1025, 64)
    assert_close(out[0], golden["vit_embeddings_out_wide_tile0"], FP32, "select_layer -3")


# ---- vision: transformers' InternVLVisionModel as the judge -------------------------------------------------
def _hf_native_keys(key: str, value: np.ndarray):
    """Official InternViT key -> transformers' InternVLVisionModel keys (qkv split into q/k/v_proj)."""
    fixed = {"embeddings.class_embedding": "embeddings.cls_token",
             "embeddings.position_embedding": "embeddings.position_embeddings",
             "embeddings.patch_embedding.weight": "embeddings.patch_embeddings.projection.weight",
             "embeddings.patch_embedding.bias": "embeddings.patch_embeddings.projection.bias"}
    if key in fixed:
        return {fixed[key]: value}
    key = key.replace("encoder.layers.", "encoder.layer.")
    for old, new in (("attn.proj.", "attention.projection_layer."), ("attn.q_norm.", "attention.q_norm."),
                     ("attn.k_norm.", "attention.k_norm."), ("norm1.", "layernorm_before."),
                     ("norm2.", "layernorm_after."), (".ls1", ".lambda_1"), (".ls2", ".lambda_2")):
        key = key.replace(old, new)
    if ".attn.qkv." in key:
        q, k, v = np.split(value, 3, axis=0)
        return {key.replace("attn.qkv.", f"attention.{n}_proj."): t for n, t in zip("qkv", (q, k, v))}
    return {key: value}


def _judge(cfg: InternViTConfig, weights):
    from transformers import InternVLVisionConfig, InternVLVisionModel as HFInternVLVisionModel

    hf_cfg = InternVLVisionConfig(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        attention_bias=cfg.qkv_bias, use_qk_norm=cfg.qk_normalization, norm_type=cfg.norm_type,
        layer_norm_eps=cfg.layer_norm_eps, image_size=[cfg.image_size] * 2, patch_size=[cfg.patch_size] * 2,
        use_mean_pooling=True,  # no final LayerNorm, as InternViT
    )
    hf_cfg._attn_implementation = "eager"
    model = HFInternVLVisionModel(hf_cfg).eval()
    state = {}
    for k, v in weights.items():
        state.update(_hf_native_keys(k, v))
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


def _run_judge(model, pixels: np.ndarray):
    """(last_hidden_state, [embeddings output, layer 1 .. layer L outputs]) of the transformers model."""
    with torch.no_grad():
        x = torch.from_numpy(pixels)
        last = model(x).last_hidden_state.numpy()
        states = [model.embeddings(x)[0]]  # the layers run one by one: HF hidden_states
        for layer in model.encoder.layer:
            states.append(layer(states[-1]))
    assert np.array_equal(states[-1].numpy(), last)
    return last, [h.numpy() for h in states]


def test_judge_matches_golden(config, image_weights, golden):
    """transformers' InternVLVisionModel on the golden weights gives the golden last hidden state."""
    judge = _judge(config.vision, _strip(image_weights, "vision_model."))
    last, _ = _run_judge(judge, golden["pixel_values_wide_max6"][:2])
    assert_close(last, golden["vit_last_hidden_wide"][:2], FP32, "transformers judge vs golden")


LN_CONFIG = InternViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                            image_size=448, patch_size=14, norm_type="layer_norm", qk_normalization=False,
                            qkv_bias=True, layer_norm_eps=1e-6)


@pytest.fixture(scope="module")
def layernorm_weights(image_weights):
    """Random weights of the 300M flavour under the official keys: the golden key list without q/k norms,
    plus norm1/norm2 biases and the qkv bias, for 3 layers (REFERENCE_INTERNVL.md section 2.2)."""
    rng = np.random.default_rng(0)
    keys = {k.replace("layers.1.", "layers.{i}.").replace("layers.0.", "layers.{i}.")
            for k in _strip(image_weights, "vision_model.") if "_norm." not in k}
    keys |= {"encoder.layers.{i}.norm1.bias", "encoder.layers.{i}.norm2.bias", "encoder.layers.{i}.attn.qkv.bias"}
    c, f = LN_CONFIG.hidden_size, LN_CONFIG.intermediate_size
    shapes = {"embeddings.class_embedding": (1, 1, c), "embeddings.position_embedding": (1, 1025, c),
              "embeddings.patch_embedding.weight": (c, 3, 14, 14), "embeddings.patch_embedding.bias": (c,),
              "attn.qkv.weight": (3 * c, c), "attn.qkv.bias": (3 * c,), "attn.proj.weight": (c, c),
              "mlp.fc1.weight": (f, c), "mlp.fc1.bias": (f,), "mlp.fc2.weight": (c, f)}
    out = {}
    for template in sorted(keys):
        for i in range(LN_CONFIG.num_hidden_layers) if "{i}" in template else (None,):
            key = template.format(i=i)
            shape = next((s for suffix, s in shapes.items() if key.endswith(suffix)), (c,))
            if key.endswith("weight") and len(shape) > 1:
                value = rng.normal(0, 1 / np.sqrt(np.prod(shape[1:])), shape)
            elif "norm" in key and key.endswith("weight"):
                value = 1 + rng.normal(0, 0.1, shape)
            elif key.endswith(("ls1", "ls2")):
                value = rng.uniform(0.2, 1.0, shape)
            elif key.startswith("embeddings.") and "patch" not in key:
                value = rng.normal(0, 0.5, shape)
            else:  # biases
                value = rng.normal(0, 0.05, shape)
            out[key] = value.astype(np.float32)
    return out


@pytest.fixture(scope="module")
def layernorm_towers(layernorm_weights):
    """(MindSpore towers for select_layer -1 and -3, the transformers judge) on the random 300M-flavour weights."""
    towers = {}
    for layer in (-1, -3):
        towers[layer] = InternVisionModel(LN_CONFIG, select_layer=layer)
        load_weights(towers[layer], DictSource(layernorm_weights))  # keys: exactly the 300M flavour's
    return towers, _judge(LN_CONFIG, layernorm_weights)


@pytest.mark.parametrize("height, width", [(448, 448), (336, 448)])
def test_layernorm_flavour_vs_transformers(ms_mode, layernorm_towers, golden, height, width):
    """300M flavour (LayerNorm, qkv bias, no q/k norm), select_layer -1 and -3 (= hidden_states[1] of 3
    layers), at 448 and at 336x448 (position grid 32x32 interpolated to 24x32)."""
    towers, judge = layernorm_towers
    pixels = np.ascontiguousarray(golden["pixel_values_wide_max6"][:2, :, :height, :width])
    last, states = _run_judge(judge, pixels)
    assert len(states) == LN_CONFIG.num_hidden_layers + 1
    for layer, expected in ((-1, last), (-3, states[-3])):
        actual = towers[layer].encode(ms.Tensor(pixels))
        assert actual.shape == (2, 1 + (height // 14) * (width // 14), 64)
        assert_close(actual, expected, FP32, f"layer_norm tower select_layer {layer} {height}x{width} ({ms_mode})")


def test_vision_refuses_wrong_grid_without_resize(layernorm_towers, golden):
    towers, _ = layernorm_towers
    with pytest.raises(ValueError, match="pos_resize"):
        towers[-1](ms.Tensor(np.ascontiguousarray(golden["pixel_values_wide_max6"][:1, :, :336])))


# ---- prompt -------------------------------------------------------------------------------------------------
def test_chat_prompt_equals_golden_query_and_ids(golden, golden_json):
    query = chat_prompt("Describe this image.", n_tiles=7, num_image_token=256)
    assert query == golden_json["chat_a"]["query"]
    assert query.count(IMG_CONTEXT_TOKEN) == golden_json["chat_a"]["n_image_context_tokens"] == 1792
    ids = InternLM2Tokenizer.from_pretrained(HF)(query)["input_ids"]
    assert np.array_equal(ids, golden["chat_a_input_ids"])


def test_prompt_structure():
    t = get_template("internlm2-chat")
    assert t.sep == "<|im_end|>" and t.stop_token_ids == (2, 92543, 92542)
    head = "<|im_start|>system\nYou are an AI assistant whose name is InternLM (书生·浦语).<|im_end|>"
    assert chat_prompt("hi", None) == head + "<|im_start|>user\nhi<|im_end|><|im_start|>assistant\n"
    # a follow-up turn replays the history as is and adds no image block
    again = chat_prompt("more?", 3, history=[("<img></img>\nq1", "a1")])
    assert again == (head + "<|im_start|>user\n<img></img>\nq1<|im_end|><|im_start|>assistant\na1<|im_end|>"
                     "<|im_start|>user\nmore?<|im_end|><|im_start|>assistant\n")
    multi = multi_image_chat_prompt("Compare.", [2, 1], num_image_token=2)
    ctx = IMG_CONTEXT_TOKEN
    assert multi == (head + "<|im_start|>user\n<image 1> (图1):<img>" + ctx * 4 + "</img><image 2> (图2):<img>"
                     + ctx * 2 + "</img>\nCompare.<|im_end|><|im_start|>assistant\n")
    with pytest.raises(PromptError, match="template"):
        chat_prompt("hi", None, template="vicuna")
