"""XComposer2ForCausalLM against the project's PyTorch reference on tiny random models, in both MindSpore modes.

The golden case covers one configuration (IXC-2.5, GQA 2, ranks 256); these tests cover the rest with weights
from `ReferenceXComposer2.random_state_dict` copied into both models: GQA ratios 1/2/4, the 4KHD and a mixed
PLoRA rank pattern, RoPE plain / linear / dynamic NTK below and beyond max_position_embeddings (16 here, so
short sequences cross it, also in cached decode steps), im_mask patterns in one batch, the 2.5 task modes, the
image side of all three variants, and the dtype rows of the tolerance table. Logits and every decoder layer's
output are compared (the reference's layers captured with forward hooks).

Measured (CPU, both modes, fp32 compute unless said): layer outputs and logits 3e-6..4e-5 max abs (8.3e-5 for
write mode's layer 1, whose outputs have RMS 7.2), rel <= 2.2e-6; assembled image tokens <= 5.3e-6, image
embeddings <= 4.4e-6, rel <= 6.6e-7; fp16 / bf16 stored weights with fp32 compute 1.2e-5, rel 1e-6; fp16 compute
2.5e-2 max abs on layer outputs of RMS 2.4, rel 1.8e-3.
"""
import numpy as np
import pytest
import mindspore as ms

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

from ms_xcomposer.models.xcomposer2.config import TASK_ADAPTERS, LLMConfig, PLoRAConfig, VisionConfig, XComposerConfig  # noqa: E402
from ms_xcomposer.models.xcomposer2 import XComposer2ForCausalLM  # noqa: E402
from ms_xcomposer.models.xcomposer2.parity import run_with_layer_outputs  # noqa: E402
from ms_xcomposer.reference import ReferenceXComposer2  # noqa: E402
from ms_xcomposer.weights import DictSource, load_weights  # noqa: E402
from tolerances import assert_close  # noqa: E402

FP32 = ("float32", "float32")
VOCAB, SEQ, MAX_POS = 128, 12, 16  # SEQ <= MAX_POS: dynamic NTK inactive; LONG > MAX_POS: active
LONG = 24
DYNAMIC_2 = {"type": "dynamic", "factor": 2.0}  # IXC-2.5's
DYNAMIC_1 = {"type": "dynamic", "factor": 1.0}  # IXC2-VL's
LINEAR_2 = {"type": "linear", "factor": 2.0}
# scales alpha / r of 2, 0.5, 1, 3 and 0.25: a wrong rank/alpha pairing would show
MIXED_RANKS = {"wqkv": PLoRAConfig(4, 8), "wo": PLoRAConfig(8, 4), "w1": PLoRAConfig(16, 16),
               "w2": PLoRAConfig(2, 6), "w3": PLoRAConfig(32, 8)}


def tiny_config(variant: str, kv_heads: int = 2, rope=None, tile: int = 56, plora=None,
                adapters: bool = False) -> XComposerConfig:
    """Hidden 64, 4 heads (head_dim 16), 2 layers; a 1-layer 32-wide ViT on `tile`-pixel tiles. plora None keeps
    the variant's released ranks (4KHD: wqkv 8/16, others 256/256)."""
    llm = LLMConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
                    intermediate_size=128, vocab_size=VOCAB, rope_theta=1e6, rope_scaling=rope,
                    max_position_embeddings=MAX_POS)
    vision = VisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_size=tile, patch_size=14)
    return XComposerConfig(variant=variant, llm=llm, vision=vision, proj_hidden=64, plora=dict(plora or {}),
                           task_adapters=TASK_ADAPTERS if adapters else (),
                           has_post_layernorm=variant != "ixc2-4khd")


CONFIGS = {
    # GQA 2, released 2.5 ranks, task adapters, dynamic NTK (factor 2), 560 tiles.
    "ixc2.5": tiny_config("ixc2.5", 2, DYNAMIC_2, tile=560, adapters=True),
    "gqa1": tiny_config("ixc2-vl", 4, None),  # plain RoPE
    "gqa4": tiny_config("ixc2-vl", 1, LINEAR_2),
    "4khd": tiny_config("ixc2-4khd", 2, None, tile=336),  # wqkv r=8 alpha=16, others 256/256
    "vl-mixed": tiny_config("ixc2-vl", 2, DYNAMIC_1, tile=490, plora=MIXED_RANKS),
}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def to_numpy(t: "torch.Tensor") -> np.ndarray:
    """A torch tensor as numpy in its own dtype (bf16 through ml_dtypes, bit-exact)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def build_pair(cfg: XComposerConfig, seed: int, storage: str = "float32", compute: str = "float32"):
    """(reference in fp32, MindSpore model) sharing random weights, rounded to `storage` for both sides."""
    state = {k: v.to(TORCH_DTYPES[storage]) for k, v in ReferenceXComposer2.random_state_dict(cfg, seed).items()}
    ref = ReferenceXComposer2.from_pretrained({k: v.float() for k, v in state.items()}, cfg)
    model = XComposer2ForCausalLM(cfg, dtype=getattr(ms, storage), compute_dtype=getattr(ms, compute))
    load_weights(model, DictSource({k: to_numpy(v) for k, v in state.items()}))
    assert model.output.weight.dtype == getattr(ms, storage)
    return ref, model


@pytest.fixture(scope="module")
def pairs():
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = build_pair(CONFIGS[name], seed=len(built) + 1)
        return built[name]

    return get


def random_ids(batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, seq)).astype(np.int64)


def block_mask(batch: int, seq: int) -> np.ndarray:
    mask = np.zeros((batch, seq), bool)
    mask[:, 3:9] = True
    return mask


def check_llm(model, ref, what: str, ids: np.ndarray, im_mask=None, key=FP32, infer_mode: str = "base",
              cache=None, ref_cache=None, use_cache: bool = False):
    """Run both models on ids [B, S] (and im_mask [B, S], caches) and compare the input embeddings, every layer's
    output and the logits. Returns (MindSpore output, reference output)."""
    mask = None if im_mask is None else torch.from_numpy(im_mask)
    ref.set_task(infer_mode)
    try:
        ref_layers, ref_out = run_with_layer_outputs(ref, input_ids=torch.from_numpy(ids), im_mask=mask,
                                                     past_key_values=ref_cache, use_cache=use_cache)
    finally:
        ref.set_task("base")
    out = model(input_ids=ids, im_mask=im_mask, past_key_values=cache, use_cache=use_cache, infer_mode=infer_mode,
                output_hidden_states=True)
    with torch.no_grad():
        embeds = ref.model.tok_embeddings(torch.from_numpy(ids))
    assert len(out.hidden_states) == len(ref_layers) + 1
    assert_close(out.hidden_states[0], embeds, key, f"{what}: embeddings")
    for i, (ms_h, ref_h) in enumerate(zip(out.hidden_states[1:], ref_layers)):
        assert_close(ms_h, ref_h, key, f"{what}: layer {i}")
    assert_close(out.logits, ref_out.logits, key, f"{what}: logits")
    return out, ref_out


# ---- language model: GQA ratios, PLoRA rank patterns, RoPE variants --------------------------------------------
@pytest.mark.parametrize("name", ["gqa1", "ixc2.5", "gqa4", "4khd", "vl-mixed"])
def test_llm_configs(ms_mode, pairs, name):
    """GQA 1 / 2 / 4 (4 heads over 4, 2, 1 KV heads), released 2.5 and 4KHD ranks, mixed ranks; RoPE plain
    (gqa1, 4khd), linear (gqa4), dynamic NTK below the limit (ixc2.5, vl-mixed); image rows at 3..8."""
    ref, model = pairs(name)
    check_llm(model, ref, name, random_ids(1, SEQ), block_mask(1, SEQ))


def test_im_mask_patterns_in_one_batch(ms_mode, pairs):
    """Batch of 4 with different image rows: none, all, a block, scattered positions."""
    ref, model = pairs("ixc2.5")
    mask = np.zeros((4, SEQ), bool)
    mask[1] = True
    mask[2, 3:9] = True
    mask[3, [0, 2, 5, 6, 11]] = True
    check_llm(model, ref, "im_mask patterns", random_ids(4, SEQ, seed=1), mask)


def test_no_image_rows(ms_mode, pairs):
    """im_mask None: the PLoRA branch is off (a separate graph on the MindSpore side), batch of 2."""
    ref, model = pairs("ixc2.5")
    check_llm(model, ref, "no im_mask", random_ids(2, SEQ, seed=2))


@pytest.mark.parametrize("mode", ["web", "write"])
def test_task_modes(ms_mode, pairs, mode):
    """IXC-2.5 web (lora_web) and write (lora_sft + lora_dpo) adapters, with image rows."""
    ref, model = pairs("ixc2.5")
    check_llm(model, ref, f"{mode} mode", random_ids(1, SEQ), block_mask(1, SEQ), infer_mode=mode)


def test_dynamic_ntk_beyond_the_limit(ms_mode, pairs):
    """A 24-token prefill past max_position_embeddings=16: the NTK base applies to every position."""
    ref, model = pairs("ixc2.5")
    ids, mask = random_ids(1, LONG, seed=3), block_mask(1, LONG)
    _, ref_out = check_llm(model, ref, "dynamic NTK beyond the limit", ids, mask)
    # The case exercises the scaling: without it the reference's logits move.
    plain = ReferenceXComposer2.from_pretrained(dict(ref.state_dict()), tiny_config("ixc2.5", 2, None, 560, None, True))
    with torch.no_grad():
        unscaled = plain(input_ids=torch.from_numpy(ids), im_mask=torch.from_numpy(mask)).logits
    assert float((unscaled - ref_out.logits).abs().max()) > 1e-2


def test_cached_decode_past_the_limit(ms_mode, pairs):
    """Prefill 14 tokens with image rows, then 4 single-token steps (positions 14..17, crossing 16): each step
    rotates its token with the base for the current total length while cached keys keep theirs."""
    ref, model = pairs("ixc2.5")
    ids, prefill = random_ids(1, 18, seed=4), 14
    out, ref_out = check_llm(model, ref, "decode prefill", ids[:, :prefill], block_mask(1, prefill), use_cache=True)
    cache, ref_cache = out.past_key_values, ref_out.past_key_values
    for pos in range(prefill, 18):
        out, _ = check_llm(model, ref, f"decode step at position {pos}", ids[:, pos:pos + 1], cache=cache,
                           ref_cache=ref_cache, use_cache=True)
        cache = out.past_key_values
    assert cache.length == ref_cache.get_seq_length() == 18 > MAX_POS


# ---- image side ------------------------------------------------------------------------------------------------
IMAGE_CASES = {"ixc2.5": (2, 1), "4khd": (1, 2), "vl-mixed": (1, 1)}  # tile grid (rows, columns)


@pytest.mark.parametrize("name", sorted(IMAGE_CASES))
def test_image_tokens_and_embeddings(ms_mode, pairs, name):
    """2.5: 560 tiles, 2x1 grid; 4KHD: 336 tiles, 1x2 grid; VL: one 490 image, no merge, no separators."""
    ref, model = pairs(name)
    cfg = CONFIGS[name]
    rows, cols = IMAGE_CASES[name]
    pixels = np.random.default_rng(5).standard_normal((1, 3, rows * cfg.tile_size, cols * cfg.tile_size))
    pixels = pixels.astype(np.float32)
    stages = ref.encode_img_stages(torch.from_numpy(pixels))
    tokens = model.encode_img(pixels, project=False)
    embeds = model.encode_img(pixels)
    n = cfg.image_tokens(rows, cols)
    assert tokens.shape == (1, n, cfg.proj_in) and embeds.shape == (1, n, cfg.llm.hidden_size)
    assert_close(tokens, stages["assembled"], FP32, f"{name}: assembled image tokens")
    assert_close(embeds, stages["img_embeds"], FP32, f"{name}: img_embeds")


# ---- dtype rows of the tolerance table ---------------------------------------------------------------------
DTYPE_ROWS = [("float16", "float32"), ("bfloat16", "float32"), ("float16", "float16")]


@pytest.fixture(scope="module")
def dtype_pairs():
    built = {}

    def get(key):
        if key not in built:
            built[key] = build_pair(CONFIGS["ixc2.5"], seed=11, storage=key[0], compute=key[1])
        return built[key]

    return get


@pytest.mark.parametrize("key", DTYPE_ROWS, ids=lambda k: f"{k[0]}-weights-{k[1]}-compute")
def test_dtype_rows(ms_mode, dtype_pairs, key):
    """Weights rounded to fp16 / bf16 (the reference computes in fp32 on the same rounded values); fp16 compute."""
    ref, model = dtype_pairs(key)
    check_llm(model, ref, f"{key[0]} weights, {key[1]} compute", random_ids(1, SEQ), block_mask(1, SEQ), key=key)
