#!/usr/bin/env python
"""Long-prompt prefill: memory and time of one `model(...)` call at N = 2k .. 12k positions, full width.

The model is IXC-2.5's language model at full width (hidden 4096, 32 query / 8 KV heads, FFN 14336, PLoRA
rank 256 on every linear) with `--layers` decoder layers (default 1) and a `--vocab`-row head, random fp32
weights. Each measurement runs in a fresh process (peak RSS only grows within a process):

    build the model, warm up with a 256-row prefill (compiles the graph), RSS before; then one prefill of N rows
    `model(inputs_embeds=..., im_mask=..., use_cache=True, last_logits_only=True)` (all rows but 16 are
    image rows, as in an HD prompt): its wall seconds and its peak RSS above the RSS before it (the inputs
    already exist; loading is not prefill).

PyTorch runs the same weights through the project's reference layers with the attention replaced by
`F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)` (PyTorch's fused CPU attention, which does not
materialise the scores), at the same N, in its own processes.

Targets (issue 10, printed PASS/FAIL): MindSpore GRAPH peak transient memory at 8k positions on one layer
<= 1.5 GB, growing <= 2.4x from 4k to 8k; the largest N (12k, more than an IXC-2.5 hd_num=24 prompt of ~10k
rows) prefills. Writes the `long_prompt` section of docs/performance.md.

    python benchmarks/bench_long_prompt.py                 # N = 2048 4096 8192 12288, GRAPH + PyTorch (~10 min)
    python benchmarks/bench_long_prompt.py --sizes 8192 --chunk 512 --no-torch --no-write
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import _report  # noqa: E402
from ms_xcomposer.memory import peak_rss, reset_peak_rss  # noqa: E402

TEXT_ROWS = 16  # rows of the prompt that are text (PLoRA off); the rest are image rows
WARMUP_ROWS = 256


def full_width_config(layers: int, vocab: int):
    """IXC-2.5's LLM at full width with `layers` layers and `vocab` head rows; a tiny unused vision tower."""
    import dataclasses

    from ms_xcomposer.models.xcomposer2.config import VisionConfig, preset

    base = preset("ixc2.5-7b")
    return dataclasses.replace(
        base, llm=dataclasses.replace(base.llm, num_hidden_layers=layers, vocab_size=vocab),
        vision=VisionConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=1, intermediate_size=64,
                            image_size=56, patch_size=14),
        task_adapters=())


def random_weights(cfg, seed: int = 0) -> Dict[str, np.ndarray]:
    """{HF key: float32 array}: norms 1, everything else N(0, 0.02), the same for both implementations."""
    from ms_xcomposer.models.xcomposer2 import FAMILY

    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in sorted(FAMILY.parameter_shapes(cfg).items()):
        if name.endswith("norm.weight"):
            out[name] = np.ones(shape, np.float32)
        else:
            out[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    return out


def inputs(n: int, hidden: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    embeds = rng.standard_normal((1, n, hidden), dtype=np.float32)
    mask = np.zeros((1, n), bool)
    mask[0, TEXT_ROWS // 2:n - TEXT_ROWS // 2] = True
    return embeds, mask


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def worker_mindspore(n: int, layers: int, vocab: int, mode: str, chunk: Optional[int]) -> Dict[str, float]:
    from ms_xcomposer import runtime

    runtime.setup("CPU", mode)
    import mindspore as ms

    from ms_xcomposer.models.xcomposer2 import XComposer2ForCausalLM
    from ms_xcomposer.weights import DictSource, load_weights

    cfg = full_width_config(layers, vocab)
    model = XComposer2ForCausalLM(cfg, dtype=ms.float32, compute_dtype=ms.float32)
    load_weights(model, DictSource(random_weights(cfg)))
    if chunk:
        model.prefill_chunk = chunk

    def prefill(embeds, mask):
        out = model(inputs_embeds=embeds, im_mask=mask, use_cache=True, last_logits_only=True)
        out.logits.asnumpy()

    prefill(*inputs(WARMUP_ROWS, cfg.llm.hidden_size))
    graphs = model.compiled_graphs()
    embeds, mask = inputs(n, cfg.llm.hidden_size)
    before = rss()
    reset_peak_rss()
    t = time.perf_counter()
    prefill(embeds, mask)
    seconds = time.perf_counter() - t
    return {"rise": peak_rss() - before, "seconds": seconds, "loaded": before,
            "new_graphs": model.compiled_graphs() - graphs, "chunk": model.prefill_chunk}


def worker_torch(n: int, layers: int, vocab: int) -> Dict[str, float]:
    import torch
    import torch.nn.functional as F

    from ms_xcomposer.reference import ReferenceXComposer2
    from ms_xcomposer.reference.internlm2 import apply_rope

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = full_width_config(layers, vocab)
    ref = ReferenceXComposer2.from_pretrained({k: torch.from_numpy(v) for k, v in random_weights(cfg).items()}, cfg)

    def sdpa(self, x, im_mask, position_ids, attn_bias, cache):
        """The reference attention with PyTorch's fused causal attention (prefill from an empty cache)."""
        b, q_len, _ = x.shape
        qkv = self.wqkv(x, im_mask).view(b, q_len, self.kv_heads, self.groups + 2, self.head_dim)
        query = qkv[:, :, :, : self.groups].reshape(b, q_len, self.heads, self.head_dim).transpose(1, 2)
        key = qkv[:, :, :, self.groups].transpose(1, 2)
        value = qkv[:, :, :, self.groups + 1].transpose(1, 2)
        cos, sin = self.rotary_emb(position_ids, q_len, query.dtype)
        query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(b, q_len, -1), im_mask)

    for layer in ref.model.layers:
        layer.attention.forward = sdpa.__get__(layer.attention)

    @torch.no_grad()
    def prefill(embeds, mask):
        x, m = torch.from_numpy(embeds), torch.from_numpy(mask)
        pos = torch.arange(x.shape[1])[None]
        for layer in ref.model.layers:
            x = layer(x, m, pos, None, None)
        ref.output(ref.model.norm(x[:, -1:])).numpy()

    prefill(*inputs(WARMUP_ROWS, cfg.llm.hidden_size))
    embeds, mask = inputs(n, cfg.llm.hidden_size)
    before = rss()
    reset_peak_rss()
    t = time.perf_counter()
    prefill(embeds, mask)
    seconds = time.perf_counter() - t
    return {"rise": peak_rss() - before, "seconds": seconds, "loaded": before}


def measure(impl: str, n: int, args) -> Optional[Dict[str, float]]:
    """One measurement in a fresh process; None when it failed (e.g. out of memory), with its last error line."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--sizes", str(n), "--layers",
           str(args.layers), "--vocab", str(args.vocab), "--mode", args.mode]
    if args.chunk:
        cmd += ["--chunk", str(args.chunk)]
    env = dict(os.environ, GLOG_v="3")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        tail = [line for line in run.stderr.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        print(f"  {impl} N={n}: failed (exit {run.returncode}): {tail[0][:200]}", flush=True)
        return None
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"  {impl} N={n}: {json.dumps(result)}", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2048,4096,8192,12288", help="prompt positions, comma-separated")
    parser.add_argument("--layers", type=int, default=1, help="decoder layers at full width (default 1)")
    parser.add_argument("--vocab", type=int, default=1024, help="head rows (default 1024)")
    parser.add_argument("--mode", default="graph", choices=("graph", "pynative"), help="MindSpore mode")
    parser.add_argument("--chunk", type=int, default=None, help="override CausalLM.prefill_chunk")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch SDPA")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/performance.md")
    parser.add_argument("--worker", choices=("mindspore", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    if args.worker:
        fn = (lambda n: worker_mindspore(n, args.layers, args.vocab, args.mode, args.chunk)) \
            if args.worker == "mindspore" else (lambda n: worker_torch(n, args.layers, args.vocab))
        print(json.dumps(fn(sizes[0])))
        return 0

    load_before = _report.load_average()
    results: Dict[str, Dict[int, Optional[Dict[str, float]]]] = {"mindspore": {}, "torch": {}}
    for n in sizes:  # interleaved: MindSpore then PyTorch at each N, so both see similar load
        results["mindspore"][n] = measure("mindspore", n, args)
        if not args.no_torch:
            results["torch"][n] = measure("torch", n, args)

    ms_res = results["mindspore"]
    chunk = next((int(r["chunk"]) for r in ms_res.values() if r), None)
    rows = []
    for n in sizes:
        m, t = ms_res.get(n), results["torch"].get(n)
        rows.append([n, f"{m['rise'] / 1e9:.2f}" if m else "failed", f"{m['seconds']:.1f}" if m else "-",
                     f"{t['rise'] / 1e9:.2f}" if t else ("failed" if not args.no_torch else "-"),
                     f"{t['seconds']:.1f}" if t else "-",
                     f"{m['seconds'] / t['seconds']:.2f}x" if m and t else "-",
                     int(m["new_graphs"]) if m else "-"])
    table = _report.table(["N", f"MindSpore {args.mode} GB above loaded", "MindSpore s", "PyTorch SDPA GB",
                           "PyTorch s", "time ratio", "graphs compiled by the call"], rows)

    checks = []
    if 8192 in ms_res:
        m8 = ms_res[8192]
        checks.append(("peak transient at 8k <= 1.5 GB", bool(m8) and m8["rise"] <= 1.5e9,
                       f"{m8['rise'] / 1e9:.2f} GB" if m8 else "failed"))
        if ms_res.get(4096) and m8:
            growth = m8["rise"] / ms_res[4096]["rise"]
            checks.append(("growth 4k -> 8k <= 2.4x", growth <= 2.4, f"{growth:.2f}x"))
    largest = max(sizes)
    checks.append((f"N={largest} prefills", bool(ms_res.get(largest)),
                   "ok" if ms_res.get(largest) else "failed"))
    checks.append(("no graph compiled by the measured calls", all(r and r["new_graphs"] == 0 for r in ms_res.values()),
                   ", ".join(str(int(r["new_graphs"])) if r else "-" for r in ms_res.values())))
    verdicts = "\n".join(f"- {_report.verdict(ok)}: {what} ({value})" for what, ok, value in checks)
    machine = _report.machine_line(load_before)
    body = f"""## Long-prompt prefill (`benchmarks/bench_long_prompt.py`)

One prefill `model(inputs_embeds=..., im_mask=..., use_cache=True, last_logits_only=True)` of N positions on
{args.layers} full-width IXC-2.5 decoder layer(s) (hidden 4096, 32/8 heads, FFN 14336, PLoRA rank 256; fp32, random
weights; all rows but {TEXT_ROWS} are image rows), each in a fresh process after a {WARMUP_ROWS}-row warm-up call: peak
RSS above the RSS before the call, and its wall seconds. MindSpore prefills in chunks of {chunk} rows
(`CausalLM.prefill_chunk`); PyTorch runs the same weights through the reference layers with
`F.scaled_dot_product_attention(is_causal=True)`.

{table}

{verdicts}

Before chunking (issue 10, the same measurement): 2.7 GB at N=2048, 7.3 GB at 4096, out of memory at 8192.
Chunks attend only over the cache slots filled so far, rounded up to 256 (`engine.attention_span`; before, every
chunk scored the whole capacity): at N=8192, `--sizes 8192 --no-torch` runs of the code before and after, in
turn (after, before), load average 6-9: 71.4 -> 67.6 s and 1.65 -> 1.44 GB; at N=12288 (the run of the code
before at load 4-5 against the 12288 row of this table's run): 128.6 -> 109.3 s and 2.82 -> 3.12 GB. The time
saved is small because the feed-forward dominates (attention over the whole capacity is ~1.1 TFLOP of the
prefill's ~4.7 at 8k; the filled part halves it on average). The peak does not fall: the last chunks see
nearly the whole cache either way, and the peak moves 0.2-0.5 GB between runs of the same code (1.20 and 1.65
GB at 8k for the code before).

Machine: {machine}.
"""
    print(body)
    if not args.no_write:
        print("wrote", _report.write_section("long_prompt", body))
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
