#!/usr/bin/env python
"""End-to-end chat speed: time to first token and decode tokens per second, MindSpore vs the PyTorch reference.

One IXC-2.5 chat turn with one image (`tests/data/ixc25_tiny/image_wide.png`, hd_num 4: global view + tiles),
greedy, `--new-tokens` new tokens at most (random weights may stop earlier on a stop id; the count is shown),
on two configs with random fp32 weights shared by both frameworks:
- `tiny`: the `tiny-ixc2.5` preset (LLM hidden 256, 2 layers; ViT width 128, 2 layers, 560 tiles);
- `mid`: LLM hidden 1024, 8 layers, 8/2 heads, FFN 4096; ViT width 512, 8 layers, 560 tiles.

MindSpore runs `ms_xcomposer.chat` (preprocessing, prompt, `encode_img`, prefill, decode) in GRAPH and
PyNative mode; PyTorch runs the reference on the same prompt pieces and pixels: `encode_img`, `interleave`,
transformers' `generate` with its KV cache. Time to first token = from the call to the first new token
reaching the streamer; tokens/s = new tokens after the first / the time they took. The implementations run
interleaved (GRAPH, PyTorch, PyNative, ...) after a warm-up turn each (GRAPH compiles then; reported apart).
Writes the `e2e` section of docs/performance.md.

    python benchmarks/bench_e2e.py                  # tiny and mid (~5 min on 2 cores)
    python benchmarks/bench_e2e.py --configs tiny --rounds 5
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _report  # noqa: E402

DATA = os.path.join(_report.ROOT, "tests", "data", "ixc25_tiny")
IMAGE = os.path.join(DATA, "image_wide.png")
QUERY = "Describe this image in detail."
HD_NUM = 4


def config(name: str):
    from ms_xcomposer.models.xcomposer2.config import VisionConfig, preset

    cfg = preset("tiny-ixc2.5")
    if name == "tiny":
        return cfg
    return dataclasses.replace(
        cfg, llm=dataclasses.replace(cfg.llm, hidden_size=1024, num_hidden_layers=8, num_attention_heads=8,
                                     num_key_value_heads=2, intermediate_size=4096),
        vision=VisionConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048,
                            image_size=560, patch_size=14),
        proj_hidden=1024)


class Clock:
    """A streamer recording when new tokens arrive (MindSpore: lists of ids; transformers: tensors)."""

    def __init__(self, skip_first_put: bool = False):
        self.skip = skip_first_put  # transformers' generate puts the prompt first
        self.start = time.perf_counter()
        self.times: List[float] = []

    def put(self, ids) -> None:
        if self.skip:
            self.skip = False
            return
        n = len(ids) if isinstance(ids, list) else int(ids.numel())
        self.times.extend([time.perf_counter()] * n)

    def end(self) -> None:
        pass

    def ttft(self) -> float:
        return self.times[0] - self.start

    def tokens_per_s(self) -> float:
        return (len(self.times) - 1) / (self.times[-1] - self.times[0]) if len(self.times) > 1 else float("nan")


def run_config(name: str, rounds: int, new_tokens: int, pynative: bool) -> Dict[str, object]:
    import mindspore as ms
    import torch

    from ms_xcomposer import XComposer2ForCausalLM, XComposer2Processor, chat_with_ids
    from ms_xcomposer.models.xcomposer2.processing import preprocess, tile_grid
    from ms_xcomposer.models.xcomposer2.prompt import TextPiece, build_chat_prompt
    from ms_xcomposer.reference.model import ReferenceXComposer2
    from ms_xcomposer.tokenizer import InternLM2Tokenizer
    from ms_xcomposer.weights import DictSource, load_weights

    cfg = config(name)
    ref = ReferenceXComposer2.from_pretrained(ReferenceXComposer2.random_state_dict(cfg, 0), cfg)
    model = XComposer2ForCausalLM(cfg, dtype=ms.float32, compute_dtype=ms.float32)
    load_weights(model, DictSource({k: v.numpy() for k, v in ref.state_dict().items()}))
    tok = InternLM2Tokenizer.from_pretrained(os.path.join(DATA, "hf"))
    processor = XComposer2Processor(tok, cfg)
    stop_ids = list(processor.eos_token_ids)

    def ms_turn(ctx):
        def turn():
            ms.set_context(mode=ctx)
            clock = Clock()
            result = chat_with_ids(model, processor, QUERY, images=[IMAGE], hd_num=HD_NUM, do_sample=False,
                                   repetition_penalty=1.0, max_new_tokens=new_tokens, streamer=clock)
            return clock, result.ids
        return turn

    @torch.no_grad()
    def torch_turn():
        clock = Clock(skip_first_put=True)
        pieces = build_chat_prompt(QUERY, (), cfg.spec, 1, False)
        parts = []
        for piece in pieces:
            if isinstance(piece, TextPiece):
                parts.append(tok.encode(piece.text, add_bos=piece.add_bos))
            else:
                parts.append(ref.encode_img(torch.from_numpy(preprocess(IMAGE, cfg.spec, HD_NUM))))
        embeds, im_mask = ref.interleave(parts)
        out = ref.generate(inputs_embeds=embeds, im_mask=im_mask, attention_mask=torch.ones(im_mask.shape),
                           eos_token_id=stop_ids, pad_token_id=2, do_sample=False, num_beams=1,
                           max_new_tokens=new_tokens, repetition_penalty=1.0, streamer=clock)
        return clock, out[0].tolist()

    turns = {"MindSpore GRAPH": ms_turn(ms.GRAPH_MODE), "PyTorch": torch_turn}
    if pynative:
        turns["MindSpore PyNative"] = ms_turn(ms.PYNATIVE_MODE)
    warm: Dict[str, float] = {}
    for impl, turn in turns.items():
        t = time.perf_counter()
        turn()
        warm[impl] = time.perf_counter() - t
    results: Dict[str, List] = {impl: [] for impl in turns}
    for _ in range(rounds):
        for impl, turn in turns.items():
            results[impl].append(turn())
    ms.set_context(mode=ms.GRAPH_MODE)
    image_rows = cfg.image_tokens(*tile_grid(preprocess(IMAGE, cfg.spec, HD_NUM), cfg.tile_size))
    return {"results": results, "warm": warm, "image_tokens": image_rows, "step_profile": step_profile(model)}


def step_profile(model, steps: int = 8):
    """(wall ms, MindSpore op ms) per GRAPH decode step after a 64-row text prefill: the difference is the
    framework's per-step cost (graph launch, dynamic-shape kernel resizing, host-side inputs)."""
    import mindspore as ms
    import numpy as np

    ms.set_context(mode=ms.GRAPH_MODE)
    embeds = model.embed_tokens(np.full((1, 64), 5, np.int32))
    state = {"cache": model(inputs_embeds=embeds, use_cache=True, last_logits_only=True,
                            cache_capacity=64 + 2 * steps + 2).past_key_values}

    def run():
        for _ in range(steps):
            out = model(input_ids=[[5]], past_key_values=state["cache"], use_cache=True, last_logits_only=True)
            state["cache"] = out.past_key_values
            out.logits.asnumpy()

    run()  # warm
    wall, ops = _report.ms_op_times(run)
    return wall / steps * 1e3, sum(ops.values()) / steps * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,mid", help="comma-separated: tiny, mid")
    parser.add_argument("--rounds", type=int, default=2, help="timed turns per implementation (default 2)")
    parser.add_argument("--new-tokens", type=int, default=32, help="max new tokens per turn (default 32)")
    parser.add_argument("--no-pynative", action="store_true", help="skip MindSpore PyNative")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/performance.md")
    args = parser.parse_args()
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    if any(n not in ("tiny", "mid") for n in names):
        parser.error("--configs takes tiny and/or mid")

    load_before = _report.load_average()
    _report.setup_mindspore("graph")
    rows, notes = [], []
    for name in names:
        res = run_config(name, args.rounds, args.new_tokens, not args.no_pynative)
        base_ttft = _report.median([c.ttft() for c, _ in res["results"]["PyTorch"]])
        base_tps = _report.median([c.tokens_per_s() for c, _ in res["results"]["PyTorch"]])
        for impl, runs in res["results"].items():
            ttft = _report.median([c.ttft() for c, _ in runs])
            tps = _report.median([c.tokens_per_s() for c, _ in runs])
            rows.append([name, impl, f"{res['warm'][impl]:.1f}", f"{ttft:.2f}", f"{ttft / base_ttft:.2f}x",
                         f"{tps:.1f}", f"{tps / base_tps:.2f}x", len(runs[0][0].times)])
        same = res["results"]["MindSpore GRAPH"][0][1][:len(res["results"]["PyTorch"][0][1])] == \
            res["results"]["PyTorch"][0][1]
        wall_ms, op_ms = res["step_profile"]
        notes.append(f"{name}: {res['image_tokens']} image rows in the prompt; GRAPH and PyTorch produced the "
                     f"same tokens: {same}; MindSpore profiler, GRAPH decode step: {wall_ms:.1f} ms wall, of which "
                     f"{op_ms:.1f} ms in ops (the rest: graph launch, dynamic-shape kernel resizing, host inputs)")
        print(f"done {name}", flush=True)
    main_table = _report.table(["config", "implementation", "warm-up turn s", "TTFT s", "TTFT vs PyTorch", "tokens/s",
                                "tokens/s vs PyTorch", "new tokens"], rows)
    print(main_table)
    print("\n".join(notes))
    if not args.no_write:
        body = "\n\n".join([
            "## End to end chat (`python benchmarks/bench_e2e.py`)",
            f"One IXC-2.5 turn, query {QUERY!r}, image `tests/data/ixc25_tiny/image_wide.png` (1000x700), hd_num "
            f"{HD_NUM}, greedy, up to {args.new_tokens} new tokens; random fp32 weights; median of {args.rounds} "
            "interleaved turns.\n\nMachine: " + _report.machine_line(load_before),
            main_table, "\n".join(f"- {n}" for n in notes), E2E_ANALYSIS,
        ])
        print("wrote", _report.write_section("e2e", body))
    return 0


E2E_ANALYSIS = """On small models the per-token cost is the framework's, not the arithmetic's: the profiler line above
shows how little of a GRAPH decode step is spent in ops. Each step launches two graphs (the token embedding
and the layer step), resizes every kernel of the dynamic-shape step graph, and builds its RoPE / mask inputs on
the host; PyTorch's eager step on the same tiny model costs less. A static-shape decode graph (fixed capacity)
with the embedding lookup inside it is the known fix, not done here (see the Ascend notes). The mid config's
larger matrices shift the balance toward the kernels."""


if __name__ == "__main__":
    sys.exit(main())
