"""The LLaVA-1.5 family's parts against transformers 4.57 on tiny random configs built here (no downloads).

- `ms_xcomposer.models.llama`: LLaMA decoder (GQA and MHA, RoPE plain / linear) against `LlamaForCausalLM`: logits,
  every hidden state, and a cached continuation, in PyNative and GRAPH, through the engine's layer contract.
- `llava.processing`: pixels bit-identical to `CLIPImageProcessor` (odd sizes, RGBA, grey, 16-bit, paths).
- `llava.tokenizer`: ids and decoded text equal to the slow `LlamaTokenizer` (legacy false / true, <image> special
  or not) on a 400-piece SentencePiece model trained here with LLaMA's structure.
- `llava.prompt`: the text equals `apply_chat_template` with llava-hf's template; ids equal `LlavaProcessor`'s.
- `llava.config`: fields as `transformers.LlavaConfig` reads them, errors, the tie rule, both key layouts.
"""
import json
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ms_xcomposer.config import LLMConfig  # noqa: E402
from ms_xcomposer.engine import attention_bias, mask_positions, row_positions  # noqa: E402
from ms_xcomposer.models.layers import Linear  # noqa: E402
from ms_xcomposer.models.llama import LlamaModel  # noqa: E402
from ms_xcomposer.config import ConfigError  # noqa: E402
from ms_xcomposer.models.llava.config import (MODULES, PUBLISHED, LlavaConfig, detect_layout,  # noqa: E402
                                              from_published, to_published)
from ms_xcomposer.models.llava.processing import PREPROCESSOR_CONFIG, LlavaImageProcessor  # noqa: E402
from ms_xcomposer.models.llava.prompt import (PromptError, conversation_messages, conversation_text,  # noqa: E402
                                              num_image_tokens, prompt_ids, render_messages)
from ms_xcomposer.models.llava.tokenizer import LlamaTokenizer  # noqa: E402
from ms_xcomposer.tokenizer import TokenizerError  # noqa: E402
from PIL import Image  # noqa: E402
from helpers_llava import SPM_VOCAB, write_llama_tokenizer  # noqa: E402
from tolerances import assert_close  # noqa: E402

FP32 = ("float32", "float32")


# ---- the LLaMA decoder against transformers' LlamaForCausalLM ---------------------------------------------
LLAMA_CONFIGS = {
    # hidden 64, 2 layers, 4 heads (head_dim 16); GQA 2 with plain RoPE, MHA with linear scaling
    "gqa2": dict(num_key_value_heads=2, rope_theta=10000.0, rope_scaling=None),
    "mha-linear": dict(num_key_value_heads=4, rope_theta=500.0, rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


def _llama_pair(name: str):
    """(transformers LlamaForCausalLM, our LlamaModel, lm_head weight, LLMConfig) with the same random weights."""
    torch.manual_seed(0)
    extra = LLAMA_CONFIGS[name]
    hf_cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5,
                                      **extra)
    ref = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # RMSNorm weights start at 1: randomise them so a skipped norm weight shows
        for n, p in ref.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    scaling = extra["rope_scaling"]
    cfg = LLMConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=extra["num_key_value_heads"], intermediate_size=128, vocab_size=96,
                    rms_norm_eps=1e-5, rope_theta=extra["rope_theta"],
                    rope_scaling=None if scaling is None else {"type": scaling["rope_type"], "factor": scaling["factor"]},
                    max_position_embeddings=64)
    decoder = LlamaModel(cfg)
    state = {k[len("model."):]: v.detach().numpy() for k, v in ref.state_dict().items() if k.startswith("model.")}
    ours = dict(decoder.parameters_and_names())
    assert sorted(ours) == sorted(state), "LlamaModel parameter names differ from HF LlamaModel's"
    for n, p in ours.items():
        assert tuple(p.shape) == state[n].shape, n
        p.set_data(ms.Tensor(state[n]))
    return ref, decoder, ref.lm_head.weight.detach().numpy(), cfg


class _Step(nn.Cell):
    """Mirror of the engine's DecoderStep: every layer with its cache, then norm and the head (GRAPH-compiled)."""

    def __init__(self, decoder, lm_head):
        super().__init__(auto_prefix=False)
        object.__setattr__(self, "decoder", decoder)  # not a child, as the engine's pieces
        self.lm_head = lm_head

    def construct(self, embeds, token_mask, cos, sin, positions, bias, k_caches, v_caches):
        x = embeds
        hidden = (x,)
        new_k = ()
        new_v = ()
        for i, layer in enumerate(self.decoder.layers):
            x, k, v = layer(x, token_mask, cos, sin, positions, bias, k_caches[i], v_caches[i], ())
            new_k = new_k + (k,)
            new_v = new_v + (v,)
            hidden = hidden + (x,)
        return self.lm_head(self.decoder.norm(x)), new_k, new_v, hidden


class _Embed(nn.Cell):
    """The engine's embedding call: `decoder.tok_embeddings(ids, compute_dtype)`."""

    def __init__(self, decoder):
        super().__init__(auto_prefix=False)
        object.__setattr__(self, "decoder", decoder)

    def construct(self, ids):
        return self.decoder.tok_embeddings(ids, ms.float32)


def _run(step, embed, cfg, ids, start, k_caches, v_caches):
    """New tokens `ids` [B, S] at positions start.. with the caches; as the engine prepares a call."""
    batch, seq = ids.shape
    positions = np.broadcast_to(np.arange(start, start + seq), (batch, seq))
    slots, cos, sin, _ = row_positions(cfg, positions, batch, seq)
    bias = attention_bias(slots, k_caches[0].shape[2])
    embeds = embed(ms.Tensor(ids.astype(np.int32)))
    mask = ms.Tensor(np.zeros(ids.shape + (1,), np.float32))
    return step(embeds, mask, ms.Tensor(cos), ms.Tensor(sin), ms.Tensor(slots), ms.Tensor(bias),
                ms.mutable(tuple(k_caches)), ms.mutable(tuple(v_caches)))


def test_mask_positions_are_transformers_generate_positions():
    """Real tokens take the positions transformers' generate derives from the mask (cumsum - 1), padding -1; with
    `past`, the last columns only (a cached step); padding between real tokens, and right padding for generation,
    are refused with the row named."""
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    expected = torch.tensor(mask).cumsum(-1) - 1  # transformers' prepare_inputs_for_generation
    got = mask_positions(mask, 6, left_only=True)
    np.testing.assert_array_equal(got[mask == 1], expected.numpy()[mask == 1])
    assert (got[mask == 0] == -1).all()
    np.testing.assert_array_equal(mask_positions(mask, 2, past=4), expected.numpy()[:, 4:])
    right = mask[:, ::-1]
    np.testing.assert_array_equal(mask_positions(right, 6)[right == 1], (np.cumsum(right, 1) - 1)[right == 1])
    with pytest.raises(ValueError, match="row 0 ends with padding: generation needs left padding"):
        mask_positions(right, 6, left_only=True)
    with pytest.raises(ValueError, match="row 1 has padding between real tokens"):
        mask_positions(np.array([[1, 1, 1], [1, 0, 1]]), 3)
    with pytest.raises(ValueError, match="it must cover the 5 cached and 2 new tokens"):
        mask_positions(mask, 2, past=5)
    with pytest.raises(ValueError, match=r"attention_mask must be 0/1 of shape \[batch, length\]"):
        mask_positions(mask * 2, 6)


@pytest.fixture(scope="module", params=sorted(LLAMA_CONFIGS))
def llama_pair(request):
    return _llama_pair(request.param)


def test_llama_decoder_matches_transformers(llama_pair, ms_mode):
    """Full-sequence logits and every hidden state, then a cached continuation (prefill 6 + 2 single steps) whose
    logits must equal the full run's at those positions."""
    ref, decoder, head, cfg = llama_pair
    ids = np.random.RandomState(1).randint(0, 96, (2, 8))
    with torch.no_grad():
        out = ref(torch.tensor(ids), output_hidden_states=True)
    lm_head = Linear(64, 96, bias=False)
    lm_head.weight.set_data(ms.Tensor(head))
    step, embed = _Step(decoder, lm_head), _Embed(decoder)
    shape = (2, cfg.num_key_value_heads, 16, cfg.head_dim)  # capacity 16 > 8: empty slots must stay hidden
    caches = [ms.Tensor(np.zeros(shape, np.float32)) for _ in range(cfg.num_hidden_layers)]
    logits, _, _, hidden = _run(step, embed, cfg, ids, 0, caches, caches)
    assert_close(logits, out.logits, FP32, f"logits ({ms_mode})")
    # HF: (embeddings, layer outputs..., the last one after the final norm)
    assert_close(hidden[0], out.hidden_states[0], FP32, "embeddings")
    for i in range(1, cfg.num_hidden_layers):
        assert_close(hidden[i], out.hidden_states[i], FP32, f"layer {i - 1} output ({ms_mode})")
    assert_close(decoder.norm(hidden[-1]), out.hidden_states[-1], FP32, f"final norm ({ms_mode})")

    k, v = caches, caches
    got = []
    for start, stop in ((0, 6), (6, 7), (7, 8)):
        logits, k, v, _ = _run(step, embed, cfg, ids[:, start:stop], start, k, v)
        got.append(logits.asnumpy())
    assert_close(np.concatenate(got, 1), out.logits, FP32, f"cached logits ({ms_mode})")


# ---- image preprocessing against CLIPImageProcessor ---------------------------------------------------------
IMAGE_CASES = [  # (width, height, PIL mode)
    (1, 1, "RGB"), (2000, 300, "RGB"), (300, 2000, "RGB"), (640, 480, "RGBA"), (333, 517, "L"), (337, 336, "RGB"),
    (336, 336, "P"), (17, 29, "LA"), (50, 3, "RGB"), (7, 1, "RGB"), (401, 999, "I;16"),
]


@pytest.fixture(scope="module")
def clip_processor():
    return transformers.CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                           resample=3, do_convert_rgb=True)


def _image(width: int, height: int, mode: str, seed: int = 0) -> Image.Image:
    rs = np.random.RandomState(seed)
    if mode == "I;16":
        return Image.fromarray(rs.randint(0, 65536, (height, width)).astype(np.uint16))  # mode I;16
    return Image.fromarray(rs.randint(0, 256, (height, width, 4), dtype=np.uint8), "RGBA").convert(mode)


@pytest.mark.parametrize("width,height,mode", IMAGE_CASES)
def test_pixels_equal_clip_image_processor(clip_processor, width, height, mode):
    """Bit-identical pixels. Images 1 or 3 pixels tall are compared with input_data_format="channels_last": without
    it transformers takes their height for the channel axis (1x1 raises, 50x3 gives other pixels)."""
    img = _image(width, height, mode)
    ours = LlavaImageProcessor()(img)
    ref = clip_processor(img, return_tensors="np", input_data_format="channels_last")["pixel_values"]
    assert ours.dtype == np.float32 and ours.shape == (1, 3, 336, 336)
    np.testing.assert_array_equal(ours, ref)
    if height not in (1, 3):  # where transformers' guess of the channel axis is right, also without the hint
        np.testing.assert_array_equal(ours, clip_processor(img, return_tensors="np")["pixel_values"])


def test_pixels_with_other_mean_and_std(tmp_path):
    """A preprocessor_config.json with its own image_mean / image_std: the same bits as CLIPImageProcessor's."""
    ref = transformers.CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                          resample=3, image_mean=[0.5, 0.25, 0.1], image_std=[0.2, 0.3, 0.7])
    ref.save_pretrained(str(tmp_path))
    img = _image(500, 375, "RGB", 5)
    np.testing.assert_array_equal(LlavaImageProcessor.from_pretrained(str(tmp_path))(img),
                                  ref(img, return_tensors="np")["pixel_values"])


def test_pixels_from_saved_processor_and_paths(clip_processor, tmp_path):
    """from_pretrained reads a preprocessor_config.json written by transformers; a list of a path and a PIL image
    gives the batch transformers gives; bad settings name the file and field."""
    clip_processor.save_pretrained(str(tmp_path))
    proc = LlavaImageProcessor.from_pretrained(str(tmp_path))
    images = [_image(500, 375, "RGB", 1), _image(220, 640, "RGBA", 2)]
    images[0].save(str(tmp_path / "a.png"))
    ours = proc([str(tmp_path / "a.png"), images[1]])
    np.testing.assert_array_equal(ours, clip_processor(images, return_tensors="np")["pixel_values"])

    cfg = json.loads((tmp_path / PREPROCESSOR_CONFIG).read_text())
    for key, value, needle in (("do_center_crop", False, "do_center_crop"), ("resample", 2, "resample"),
                               ("image_mean", [0.5, 0.5], "image_mean"), ("image_std", [0.5, 0.0, 0.5], "image_std"),
                               ("crop_size", {"height": 400, "width": 400}, "larger than")):
        (tmp_path / PREPROCESSOR_CONFIG).write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ConfigError, match=needle) as err:
            LlavaImageProcessor.from_pretrained(str(tmp_path))
        assert PREPROCESSOR_CONFIG in str(err.value)


# ---- the LLaMA tokenizer against transformers' slow LlamaTokenizer ---------------------------------------------
TEXTS = [
    "USER: <image>\nWhat is shown in this image? ASSISTANT:", "<image>hello", "hello  world\n\n  x  ", "你好，请描述这张图片。",
    "", " ", "▁a ▁", "a<image><image>b <pad> </s>x", "  leading spaces", "The 2024 dog</s><s>", "Describe 天空 (sky)!",
    "\n<image>\n", "<unk> tail",
]
TOKENIZER_VARIANTS = {"llava-hf": dict(legacy=False), "image-token-special": dict(legacy=False, extra_special=True),
                      "legacy": dict(legacy=True)}


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_tok")
    return {name: write_llama_tokenizer(root / name, **kw) for name, kw in TOKENIZER_VARIANTS.items()}


@pytest.mark.parametrize("variant", sorted(TOKENIZER_VARIANTS))
def test_tokenizer_equals_transformers(tokenizer_dirs, variant):
    ref = transformers.LlamaTokenizer.from_pretrained(tokenizer_dirs[variant])
    ours = LlamaTokenizer.from_pretrained(tokenizer_dirs[variant])
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, SPM_VOCAB + 1)
    assert ours.convert_tokens_to_ids("<image>") == SPM_VOCAB
    for text in TEXTS:
        ids = ref(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_bos=False) == ref(text, add_special_tokens=False)["input_ids"], text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), (text, skip)


# ---- the conversation format and LlavaProcessor's input_ids ---------------------------------------------------
# llava-hf/llava-1.5-7b-hf chat_template.json (the {% generation %} revision), as published.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
CHATS = [  # (query, history, n_images, system)
    ("What is shown in this image?", [], 1, ""),
    ("And the colours?", [("What is shown?", "Two cats on a sofa."), ("Where?", "In a room.")], 1, ""),
    ("Compare them.", [], 2, "You are a helpful assistant."),
    ("Tell me a story.", [("Hi", "Hello!")], 0, ""),
]


@pytest.mark.parametrize("query,history,n_images,system", CHATS)
def test_conversation_equals_chat_template(tokenizer_dirs, query, history, n_images, system):
    ref = transformers.LlamaTokenizer.from_pretrained(tokenizer_dirs["llava-hf"])
    messages = conversation_messages(query, history, n_images, system)
    expected = ref.apply_chat_template(messages, chat_template=LLAVA_CHAT_TEMPLATE, add_generation_prompt=True,
                                       tokenize=False)
    assert conversation_text(query, history, n_images, system) == expected
    assert render_messages(messages, add_generation_prompt=False) == ref.apply_chat_template(
        messages, chat_template=LLAVA_CHAT_TEMPLATE, tokenize=False)


def test_single_turn_text():
    assert conversation_text("What are these?") == "USER: <image>\nWhat are these? ASSISTANT:"
    assert conversation_text("q2", [("q1", "a1")]) == "USER: <image>\nq1 ASSISTANT: a1 USER: q2 ASSISTANT:"
    with pytest.raises(PromptError, match="plain string"):
        render_messages([{"role": "user", "content": "hi"}])
    with pytest.raises(PromptError, match=r"history\[0\]"):
        conversation_text("q", [("only one",)])


def test_tokenizer_config_errors(tokenizer_dirs, tmp_path):
    src = tokenizer_dirs["llava-hf"]
    dst = tmp_path / "bad"
    dst.mkdir()
    (dst / "tokenizer.model").write_bytes(open(os.path.join(src, "tokenizer.model"), "rb").read())
    config = json.load(open(os.path.join(src, "tokenizer_config.json")))
    (dst / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": "no"}))
    with pytest.raises(TokenizerError, match="legacy should be true or false"):
        LlamaTokenizer.from_pretrained(str(dst))
    (dst / "tokenizer_config.json").write_text(json.dumps({**config, "extra_special_tokens": {"x": "<video>"}}))
    with pytest.raises(TokenizerError, match="<video>"):
        LlamaTokenizer.from_pretrained(str(dst))
    (dst / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "middle"}))
    with pytest.raises(TokenizerError, match="tokenizer_config.json padding_side 'middle': expected 'left' or 'right'"):
        LlamaTokenizer.from_pretrained(str(dst))
    (dst / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "padding_side"}))
    # without the key: left, as the LlamaTokenizerFast AutoTokenizer loads
    assert LlamaTokenizer.from_pretrained(str(dst)).padding_side == transformers.AutoTokenizer.from_pretrained(
        str(dst)).padding_side == "left"


@pytest.mark.parametrize("strategy,variant", [("default", "llava-hf"), ("full", "llava-hf"),
                                              ("default", "image-token-special"), ("default", "legacy")])
def test_prompt_ids_equal_llava_processor(tokenizer_dirs, clip_processor, strategy, variant):
    """Our ids for the same text equal LlavaProcessor(images=..., text=...)["input_ids"] (576 / 577 image tokens)."""
    ref = transformers.LlavaProcessor(image_processor=clip_processor,
                                      tokenizer=transformers.LlamaTokenizer.from_pretrained(tokenizer_dirs[variant]),
                                      patch_size=14, vision_feature_select_strategy=strategy,
                                      num_additional_image_tokens=1)
    # LlavaProcessor takes the image token's id from encode("<image>")[0]; with legacy=false and <image> not special
    # that is the id of the prefix "▁" and its own count check fails. The ids under test come from its tokenizer call.
    ref.image_token_id = SPM_VOCAB
    tok = LlamaTokenizer.from_pretrained(tokenizer_dirs[variant])
    n_tokens = num_image_tokens(336, 14, 1, strategy)
    assert n_tokens == (576 if strategy == "default" else 577)
    images = [_image(640, 480, "RGB", 3), _image(300, 500, "RGB", 4)]
    for query, history, n_images, system in CHATS:
        text = conversation_text(query, history, n_images, system)
        ours = prompt_ids(tok, text, n_images, n_tokens)
        if n_images:
            out = ref(images=images[:n_images], text=text)
            np.testing.assert_array_equal(LlavaImageProcessor()(images[:n_images]), np.stack(out["pixel_values"]))
        else:
            out = ref(text=text)
        assert ours == out["input_ids"][0], text
        assert ours.count(SPM_VOCAB) == n_images * n_tokens
    with pytest.raises(PromptError, match="1 <image> token"):
        prompt_ids(tok, conversation_text("q", n_images=1), 2, n_tokens)


# ---- LlavaConfig and the key layouts -------------------------------------------------------------------------
RELEASED_7B = {  # llava-hf/llava-1.5-7b-hf config.json (the fields it sets)
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "vision_config": {
        "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
        "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
        "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}


def _expected_from_transformers(hf: dict) -> dict:
    ref = transformers.LlavaConfig(**json.loads(json.dumps(hf)))
    t, v = ref.text_config, ref.vision_config
    return dict(
        llm=(t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size,
             t.vocab_size, t.rms_norm_eps, t.rope_theta, t.max_position_embeddings),
        vision=(v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size, v.image_size,
                v.patch_size, v.layer_norm_eps, v.hidden_act),
        top=(ref.image_token_index, ref.vision_feature_layer, ref.vision_feature_select_strategy,
             ref.projector_hidden_act, ref.multimodal_projector_bias, t.tie_word_embeddings))


@pytest.mark.parametrize("hf", [RELEASED_7B, {"architectures": ["LlavaForConditionalGeneration"]},
                                {**RELEASED_7B, "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
                                 "text_config": {"num_key_value_heads": 8, "tie_word_embeddings": True}}])
def test_config_fields_equal_transformers(hf):
    """Every field as transformers.LlavaConfig reads it, defaults included (missing text / vision sections too)."""
    cfg = LlavaConfig.from_hf(hf)
    e = _expected_from_transformers(hf)
    l, v = cfg.llm, cfg.vision
    assert (l.hidden_size, l.num_hidden_layers, l.num_attention_heads, l.num_key_value_heads, l.intermediate_size,
            l.vocab_size, l.rms_norm_eps, l.rope_theta, l.max_position_embeddings) == e["llm"]
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size, v.image_size,
            v.patch_size, v.layer_norm_eps, v.hidden_act) == e["vision"]
    assert (cfg.image_token_index, cfg.vision_feature_layer, cfg.vision_feature_select_strategy,
            cfg.projector_hidden_act, cfg.projector_bias, cfg.tie_word_embeddings) == e["top"]
    assert cfg.image_tokens == (577 if cfg.vision_feature_select_strategy == "full" else 576)
    assert LlavaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("patch,needle", [
    ({"vision_feature_select_strategy": "crop"}, "vision_feature_select_strategy"),
    ({"vision_feature_layer": [-2, -5]}, "vision_feature_layer"),
    ({"vision_feature_layer": -26}, "vision_feature_layer"),
    ({"projector_hidden_act": "relu"}, "projector_hidden_act"),
    ({"text_config": {"model_type": "mistral"}}, "text_config.model_type"),
    ({"text_config": {"mlp_bias": True}}, "text_config.mlp_bias"),
    ({"text_config": {"num_attention_heads": 32, "num_key_value_heads": 5}}, "num_key_value_heads"),
    ({"text_config": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}}, "rope_scaling"),
    ({"vision_config": {"hidden_act": "gelu"}}, "vision_config.hidden_act"),
    ({"text_config": {"hidden_size": "wide"}}, "wrong type"),
])
def test_config_errors_name_file_and_field(tmp_path, patch, needle):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**RELEASED_7B, **patch}))
    with pytest.raises(ConfigError, match=needle) as err:
        LlavaConfig.from_file(str(tmp_path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("content,needle", [
    (None, "config file {} does not exist"),
    ("{not json", "config file {} is not valid JSON"),
    ("[1, 2]", "config file {} does not hold a JSON object"),
])
def test_config_file_errors_name_the_file(tmp_path, content, needle):
    """A missing, malformed or non-object config.json: one line naming the file and the problem."""
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        LlavaConfig.from_file(str(tmp_path))
    assert needle.format(path) in str(err.value) and "\n" not in str(err.value)


def test_tied_head_follows_text_config():
    """transformers ties lm_head to the embedding by text_config.tie_word_embeddings, not the top-level flag."""
    for text_tie, top_tie in ((True, False), (False, True)):
        hf = {"text_config": {**TINY_TEXT, "tie_word_embeddings": text_tie}, "vision_config": TINY_VISION,
              "tie_word_embeddings": top_tie}
        model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**json.loads(json.dumps(hf))))
        tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        assert LlavaConfig.from_hf(hf).tie_word_embeddings == tied == text_tie


TINY_TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1)
TINY_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                   patch_size=14)


def test_key_layouts(tmp_path):
    """The module layout is transformers 4.57's state_dict, the published one what save_pretrained writes; both
    map onto the published (= MindSpore) names and back."""
    from safetensors import safe_open

    hf = {"text_config": TINY_TEXT, "vision_config": TINY_VISION}
    model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**json.loads(json.dumps(hf))))
    modules = sorted(model.state_dict())
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        published = sorted(f.keys())
    assert detect_layout(modules) == MODULES and detect_layout(published) == PUBLISHED
    assert sorted(to_published(n, MODULES) for n in modules) == published
    assert [from_published(to_published(n, MODULES), MODULES) for n in modules] == modules
    assert [to_published(n, PUBLISHED) for n in published] == published
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in published
    with pytest.raises(ConfigError, match="mixes"):
        detect_layout(published[:1] + modules[:1])
    with pytest.raises(ConfigError, match="not an llava-hf checkpoint"):
        detect_layout(["vit.vision_tower.vision_model.embeddings.patch_embedding.weight"])
