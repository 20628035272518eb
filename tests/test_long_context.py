"""Long inputs (issue 10): chunked prefill equals the unchunked one, its memory grows linearly, and dynamic-NTK
RoPE past max_position_embeddings matches the float64 reference; all on the golden IXC-2.5 tiny model, both modes.

Measured on the development machine (both modes): chunked (128 rows) vs unchunked logits, hidden states and KV
cache max abs ~1e-5 on logits of RMS ~4 (within the fp32 bound); 5000 positions (NTK base 1.46e6) last-4 logits
vs the float64 reference 7.7e-5 max abs (0.19 of the fp32 bound; 3.0x it with float32 RoPE tables, whose
numpy and PyTorch pow kernels differ by one ulp in one high frequency at that NTK base).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms

from ms_xcomposer import memory
from ms_xcomposer.models import rope
from ms_xcomposer.models.xcomposer2 import FAMILY, XComposer2ForCausalLM
from tolerances import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests/data/ixc25_tiny")
FP32 = ("float32", "float32")
UNCHUNKED = 1 << 30
NTK_LENGTH = 5000  # past max_position_embeddings (4096): dynamic-NTK base 1.46e6


@pytest.fixture(scope="module", params=["pynative", "graph"])
def model(request):
    ms.set_context(mode=ms.GRAPH_MODE if request.param == "graph" else ms.PYNATIVE_MODE)
    yield XComposer2ForCausalLM.from_pretrained(f"{DATA}/hf_safetensors")
    ms.set_context(mode=ms.PYNATIVE_MODE)


def _run(model, chunk, **kwargs):
    model.prefill_chunk = chunk
    try:
        return model(**kwargs)
    finally:
        del model.prefill_chunk  # back to the class default


def test_chunked_prefill_equals_unchunked(model):
    """600 rows in chunks of 128 (the last one shorter), then a 300-row continuation of the cache, against one
    call each: logits, every layer's hidden states, the KV cache, last_logits_only, greedy decode tokens, and no
    extra compiled graph."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 1000, size=(1, 900)).astype(np.int32)
    mask = np.zeros((1, 900), bool)
    mask[:, 50:450] = True  # image rows (PLoRA on) across chunk boundaries
    first = dict(input_ids=ids[:, :600], im_mask=mask[:, :600], use_cache=True, output_hidden_states=True,
                 cache_capacity=1024)
    whole = _run(model, UNCHUNKED, **first)
    graphs = model.compiled_graphs()
    parts = _run(model, 128, **first)
    assert model.compiled_graphs() == graphs  # chunks of 128 and the last one of 88 rows: the same graph
    assert_close(parts.logits.asnumpy(), whole.logits.asnumpy(), FP32, "chunked logits")
    assert len(parts.hidden_states) == len(whole.hidden_states) == 3
    for i, (a, b) in enumerate(zip(parts.hidden_states, whole.hidden_states)):
        assert a.shape == b.shape == (1, 600, 256)
        assert_close(a.asnumpy(), b.asnumpy(), FP32, f"chunked hidden state {i}")
    pc, wc = parts.past_key_values, whole.past_key_values
    assert pc.length == wc.length == 600 and pc.capacity == wc.capacity == 1024
    for a, b in zip(pc.keys + pc.values, wc.keys + wc.values):
        assert_close(a.asnumpy(), b.asnumpy(), FP32, "chunked KV cache")

    last = _run(model, 128, input_ids=ids[:, :600], im_mask=mask[:, :600], last_logits_only=True)
    assert last.logits.shape == (1, 1, 1000)
    assert_close(last.logits.asnumpy(), whole.logits.asnumpy()[:, -1:], FP32, "chunked last logits")

    more = dict(input_ids=ids[:, 600:], im_mask=mask[:, 600:], use_cache=True)
    b = _run(model, UNCHUNKED, past_key_values=wc, **more)
    continued = model.compiled_graphs()
    a = _run(model, 128, past_key_values=pc, **more)
    assert model.compiled_graphs() == continued  # the chunks reuse the unchunked call's graph
    assert_close(a.logits.asnumpy(), b.logits.asnumpy(), FP32, "chunked continuation logits")

    tokens = []
    for out in (a, b):
        cache, seq = out.past_key_values, []
        token = int(out.logits.asnumpy()[0, -1].argmax())
        for _ in range(4):
            seq.append(token)
            step = model(input_ids=[[token]], past_key_values=cache, use_cache=True, last_logits_only=True)
            cache, token = step.past_key_values, int(step.logits.asnumpy()[0, -1].argmax())
        tokens.append(seq)
    assert tokens[0] == tokens[1]


def test_rope_tables_official_below_the_limit_float64_past_it():
    """Up to max_position_embeddings: the official float32 tables, op for op. Past it (dynamic NTK): float64
    maths rounded once (the official float32 tables there depend on the platform's pow kernel: see rope.py)."""
    from ms_xcomposer.conversion.readers import open_checkpoint

    llm = open_checkpoint(f"{DATA}/hf").config.llm
    d = llm.head_dim
    cos, sin = rope.cos_sin(llm, 0, 4096)
    e = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)
    angles = np.outer(np.arange(4096, dtype=np.float32), np.float32(1) / (np.float32(llm.rope_theta) ** e))
    angles = np.concatenate([angles, angles], -1)
    assert np.array_equal(cos, np.cos(angles)) and np.array_equal(sin, np.sin(angles))
    for start, length, total in ((0, NTK_LENGTH, NTK_LENGTH), (24000, 8, 24008)):
        cos, sin = rope.cos_sin(llm, start, length, total)
        freqs = 1.0 / (rope.rope_base(llm, total) ** (np.arange(0, d, 2, dtype=np.float64) / d))
        angles = np.outer(np.arange(start, start + length, dtype=np.float64), freqs)
        angles = np.concatenate([angles, angles], -1)
        assert cos.dtype == sin.dtype == np.float32
        assert np.abs(cos - np.cos(angles)).max() <= 6e-8 and np.abs(sin - np.sin(angles)).max() <= 6e-8


@pytest.fixture(scope="module")
def ntk_reference():
    """Random ids of NTK_LENGTH positions and the float64 reference's last-4 logits (NTK tables in float64)."""
    torch = pytest.importorskip("torch")
    from ms_xcomposer.reference import ReferenceXComposer2

    ids = np.random.default_rng(1).integers(3, 1000, size=(1, NTK_LENGTH)).astype(np.int64)
    ref = ReferenceXComposer2.from_pretrained(f"{DATA}/hf", dtype=torch.float64)
    with torch.no_grad():
        logits = ref(input_ids=torch.from_numpy(ids)).logits[:, -4:].double().numpy()
    return ids, logits


def test_dynamic_ntk_past_the_limit_matches_float64_reference(model, ntk_reference):
    ids, expected = ntk_reference
    logits = model(input_ids=ids.astype(np.int32)).logits.asnumpy()[:, -4:]
    assert_close(logits, expected, FP32, f"logits at {NTK_LENGTH} positions (dynamic NTK)")


MEASURE = r"""
import json, os, sys
os.environ.setdefault("GLOG_v", "3")
import numpy as np, psutil
import mindspore as ms
from ms_xcomposer.memory import peak_rss, reset_peak_rss
from ms_xcomposer.models.xcomposer2 import XComposer2ForCausalLM

path, mode, sizes = sys.argv[1], sys.argv[2], [int(n) for n in sys.argv[3:]]
ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
model = XComposer2ForCausalLM.from_pretrained(path)
rng = np.random.default_rng(0)

def prefill(n):
    ids = rng.integers(3, 1000, size=(1, n)).astype(np.int32)
    mask = np.zeros((1, n), bool)
    mask[:, 1:n - 8] = True
    model(input_ids=ids, im_mask=mask, use_cache=True, last_logits_only=True).logits.asnumpy()

prefill(300)  # warm-up: compiles, first kernels
rises = []
for n in sizes:
    before = psutil.Process().memory_info().rss
    reset_peak_rss()
    prefill(n)
    rises.append(peak_rss() - before)
print(json.dumps(rises))
"""


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_prefill_memory_grows_linearly(mode):
    """Peak RSS rise of one prefill at 2048 and 8192 positions (4x): chunked it grows about 4x (capacity x chunk),
    unchunked it grew 16x (the [heads, S, capacity] scores). The 8192 rise must also be within the memory
    estimate's bounds (tests/test_memory.py: measured / estimated in [1/2, 1.5])."""
    small, large = 2048, 8192
    env = {k: v for k, v in os.environ.items() if k != "GLOG_v"}
    run = subprocess.run([sys.executable, "-c", MEASURE, f"{DATA}/hf_safetensors", mode, str(small), str(large)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    rise_small, rise_large = json.loads(run.stdout.strip().splitlines()[-1])
    assert rise_large / rise_small <= 6, (rise_small, rise_large)
    from ms_xcomposer.conversion.readers import open_checkpoint

    config = open_checkpoint(f"{DATA}/hf").config
    weights = memory.parameter_bytes(FAMILY.parameter_shapes(config), "float32")
    est = memory.estimate(config, prompt_rows=large, max_new_tokens=1, compute_dtype="float32",
                          weight_dtype="float32", weight_bytes=weights)
    ratio = rise_large / (est.activation + 2 * est.kv_cache)
    assert 1 / 2 <= ratio <= 1.5, (ratio, rise_small, rise_large)
