"""The LLaVA-1.5 family's parts against transformers 4.57 on tiny random configs built here (no downloads).

- `ms_xcomposer.models.llama`: LLaMA decoder (GQA and MHA, RoPE plain / linear) against `LlamaForCausalLM`: logits,
  every hidden state, and a cached continuation, in PyNative and GRAPH, through the engine's layer contract.
"""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ms_xcomposer.config import LLMConfig  # noqa: E402
from ms_xcomposer.models import rope  # noqa: E402
from ms_xcomposer.models.layers import Linear  # noqa: E402
from ms_xcomposer.models.llama import LlamaModel  # noqa: E402
from tolerances import assert_close  # noqa: E402

FP32 = ("float32", "float32")


# ---- the LLaMA decoder against transformers' LlamaForCausalLM ---------------------------------------------
MASKED = -1e30
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
    seq = ids.shape[1]
    cos, sin = rope.cos_sin(cfg, start, seq)
    capacity = k_caches[0].shape[2]
    query_pos = np.arange(start, start + seq)
    bias = np.where(np.arange(capacity)[None, :] <= query_pos[:, None], 0.0, MASKED).astype(np.float32)
    embeds = embed(ms.Tensor(ids.astype(np.int32)))
    mask = ms.Tensor(np.zeros(ids.shape + (1,), np.float32))
    return step(embeds, mask, ms.Tensor(cos), ms.Tensor(sin), ms.Tensor(query_pos.astype(np.int32)), ms.Tensor(bias),
                ms.mutable(tuple(k_caches)), ms.mutable(tuple(v_caches)))


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
