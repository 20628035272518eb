#!/usr/bin/env python
"""Serving throughput: aggregate completion tokens/s and time to first token at concurrency 1, 4, 8, 16 against a
running `ms-xcomposer serve` (continuous batching), text-only streaming requests over plain HTTP.

Two servers, each a subprocess on 127.0.0.1 (the client threads run in this process, outside the server's GIL):
- `tiny`: `ms-xcomposer serve` on the golden IXC-2.5 tiny model (tests/data/ixc25_tiny, converted here);
- `full-width`: IXC-2.5's language model at full width (hidden 4096, 32/8 heads, FFN 14336, PLoRA rank 256) with
  `--layers` decoder layers, random weights, the tiny tokenizer's vocabulary and a tiny vision tower (this
  script started with --serve-full-width: the model is built in memory, no checkpoint written).

At each concurrency c, c clients each send `--requests` requests one after the other (different short prompts,
max_tokens fixed, greedy); tokens/s = completion tokens (from `usage`) / wall time of the phase; TTFT = time from
sending a request to its first content chunk (median over the phase). A warm-up phase first (the GRAPH-mode
compilations). Targets (issue 11), printed PASS/FAIL:
- tiny: tokens/s at concurrency 8 >= 2.5x concurrency 1 (a tiny decode step costs about the same at any batch
  size, so this measures the batching itself);
- full-width: tokens/s at concurrency 8 >= 4x concurrency 1; TTFT at concurrency 8 <= 2x concurrency 1.
Writes the `serve` section of docs/performance.md (unless --no-write).

    python benchmarks/bench_serve.py                    # both servers, GRAPH mode (~10-20 min on 2 busy cores)
    python benchmarks/bench_serve.py --only tiny --mode pynative
    python benchmarks/bench_serve.py --only profile --no-write  # where a full-width round's time goes
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _report  # noqa: E402

TINY_HF = os.path.join(ROOT, "tests", "data", "ixc25_tiny", "hf")
CONCURRENCY = (1, 4, 8, 16)
MODEL_ID = "bench"


# ---- the full-width server (this script, run as a subprocess) ----------------------------------------------
def build_full_width(tokenizer_dir: str, layers: int):
    """(model, processor): IXC-2.5's language model at full width with `layers` decoder layers, random weights,
    the tokenizer (and vocabulary) of the checkpoint at `tokenizer_dir`, a tiny vision tower."""
    import numpy as np
    from mindspore import Tensor

    from ms_xcomposer.conversion.readers import open_checkpoint
    from ms_xcomposer.models.xcomposer2 import XComposer2ForCausalLM
    from ms_xcomposer.models.xcomposer2.config import VisionConfig, preset
    from ms_xcomposer.models.xcomposer2.processor import XComposer2Processor
    from ms_xcomposer.tokenizer import InternLM2Tokenizer

    tokenizer = InternLM2Tokenizer.from_pretrained(tokenizer_dir)
    with open_checkpoint(tokenizer_dir) as reader:  # the tiny model: its vocabulary fits the tokenizer
        vocab = reader.config.llm.vocab_size
    base = preset("ixc2.5-7b")
    cfg = dataclasses.replace(
        base, llm=dataclasses.replace(base.llm, num_hidden_layers=layers, vocab_size=vocab),
        vision=VisionConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=1, intermediate_size=64,
                            image_size=56, patch_size=14))
    model = XComposer2ForCausalLM(cfg)
    rng = np.random.default_rng(0)
    for name, p in model.parameters_and_names():
        shape = tuple(p.shape)
        value = np.ones(shape, np.float32) if name.endswith("norm.weight") else \
            (rng.standard_normal(shape, np.float32) * np.float32(0.02))
        p.set_data(Tensor(value))
    return model, XComposer2Processor(tokenizer, cfg)


def serve_full_width(tokenizer_dir: str, layers: int, mode: str, max_batch: int,
                     max_prefill_tokens: Optional[int]) -> None:
    """Build the full-width model with random weights and serve it like `ms-xcomposer serve` does."""
    import uvicorn

    from ms_xcomposer import runtime
    from ms_xcomposer.scheduler import BatchingEngine
    from ms_xcomposer.server.app import create_app

    runtime.setup("CPU", mode)
    model, processor = build_full_width(tokenizer_dir, layers)
    options = {} if max_prefill_tokens is None else {"max_prefill_tokens": max_prefill_tokens}
    engine = BatchingEngine(model, processor, max_batch=max_batch, max_queue=256, **options).start()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, MODEL_ID), host="127.0.0.1", port=0,
                                           log_level="warning"))
    original = server.startup

    async def startup(sockets=None):
        await original(sockets)
        print(f"serving at http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", flush=True)

    server.startup = startup
    server.run()


# ---- where a full-width engine round's time goes (in this process, no server) -----------------------------
def engine_profile(tokenizer_dir: str, layers: int, mode: str, rounds: int = 3) -> Dict[str, float]:
    """Seconds of the engine's pieces on the full-width model, the benchmark's prompts, min over `rounds`
    interleaved rounds: prefill of 1, 4 and 8 prompts together (`join`), a decode step at batch 1, 4 and 8
    (`DecodeBatch.step`) and its model call (logits copied to the host; the rest is host work: token choice,
    callbacks, dropping finished rows), and the decode FFN product x [M, 4096] @ W[14336, 4096].T at M = 1 and 8
    (MatMul transpose_b, as models/layers.linear)."""
    import numpy as np
    from mindspore import Tensor, ops

    from ms_xcomposer import runtime
    from ms_xcomposer.batching import DecodeBatch, Row, batch_key
    from ms_xcomposer.conversation import prepare_turn

    runtime.setup("CPU", mode)
    model, processor = build_full_width(tokenizer_dir, layers)

    def rows(k: int) -> List[Row]:
        turns = [prepare_turn(model, processor, f"c8 client {i} request 0: tell me a story about the number {i * 7}.",
                              None, (), max_new_tokens=64) for i in range(k)]
        return [Row(t.inputs, t.generation) for t in turns]

    width = model.llm_config.intermediate_size
    weight = Tensor(np.random.default_rng(0).standard_normal((width, model.llm_config.hidden_size), np.float32))
    matmul = ops.MatMul(transpose_b=True)
    out: Dict[str, float] = {}

    def keep(name: str, seconds: float) -> None:
        out[name] = min(out.get(name, seconds), seconds)

    key = batch_key(model, rows(1)[0].inputs.extras)
    warm = DecodeBatch(model, key)
    warm.join(rows(2))
    warm.step()
    for _ in range(rounds):
        for k in (1, 4, 8):
            batch = DecodeBatch(model, key)
            joining = rows(k)
            t0 = time.perf_counter()
            batch.join(joining)
            keep(f"prefill {k}", time.perf_counter() - t0)
            batch.step()
            timed = _TimedModel(model)
            batch.model = timed  # the step's model call timed inside the step itself
            for _ in range(3):
                t0 = time.perf_counter()
                batch.step()
                step = time.perf_counter() - t0
                keep(f"step {k}", step)
                keep(f"model call {k}", timed.seconds)
                keep(f"host {k}", step - timed.seconds)
        for m in (1, 8):
            x = Tensor(np.ones((m, model.llm_config.hidden_size), np.float32))
            matmul(x, weight).asnumpy()
            t0 = time.perf_counter()
            matmul(x, weight).asnumpy()
            keep(f"ffn matmul {m}", time.perf_counter() - t0)
    out["prompt tokens"] = rows(1)[0].prompt_length
    return out


class _TimedModel:
    """Calls the model and keeps the seconds of the last call, its logits copied to the host included."""

    def __init__(self, model):
        self.model, self.seconds = model, 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.model(*args, **kwargs)
        out.logits.asnumpy()
        self.seconds = time.perf_counter() - t0
        return out


def profile_lines(p: Dict[str, float], args) -> List[str]:
    ms = {k: v * 1e3 for k, v in p.items() if k != "prompt tokens"}
    d1, d8 = ms["step 1"], ms["step 8"]
    prefill = ms["prefill 1"]
    table = _report.table(["piece", "batch 1", "batch 4", "batch 8", "batch 8 / batch 1"], [
        [f"prefill ({int(p['prompt tokens'])}-token prompts, together) ms", f"{ms['prefill 1']:.0f}",
         f"{ms['prefill 4']:.0f}", f"{ms['prefill 8']:.0f}", f"{ms['prefill 8'] / ms['prefill 1']:.2f}x"],
        ["decode step (`DecodeBatch.step`) ms", f"{d1:.0f}", f"{ms['step 4']:.0f}", f"{d8:.0f}", f"{d8 / d1:.2f}x"],
        ["its model call (logits on the host) ms", f"{ms['model call 1']:.0f}", f"{ms['model call 4']:.0f}",
         f"{ms['model call 8']:.0f}", f"{ms['model call 8'] / ms['model call 1']:.2f}x"],
        ["host work (step - model call: token choice, callbacks, cache rows) ms", f"{ms['host 1']:.1f}",
         f"{ms['host 4']:.1f}", f"{ms['host 8']:.1f}", ""],
        ["FFN product [M, 4096] @ [4096, 14336] ms", f"{ms['ffn matmul 1']:.1f}", "",
         f"{ms['ffn matmul 8']:.1f}", f"{ms['ffn matmul 8'] / ms['ffn matmul 1']:.2f}x"]])
    # The best a scheduler can do with the benchmark's requests (n new tokens each): c=1 costs prefill + (n-1)
    # batch-1 steps per request; c=8 at least 8 prefills (batched: prefill 8) + (n-1) batch-8 steps per 8
    # requests, with nothing idle.
    n = args.max_tokens_full
    bound = 8 * (prefill + (n - 1) * d1) / (ms["prefill 8"] + (n - 1) * d8)
    ideal = 8 * (prefill + (n - 1) * d1) / (ms["prefill 8"] + (n - 1) * d1)
    share = prefill / (prefill + (n - 1) * d1)
    return [f"Where the time goes (`--profile`, this process, {args.mode} mode, min of 3 interleaved rounds, "
            f"{_report.machine_line(_report.load_average())}):", "", table, "",
            f"The c=8 / c=1 throughput these pieces allow, for requests of {n} new tokens: "
            f"8 x (prefill 1 + {n - 1} steps at batch 1) / (prefill 8 + {n - 1} steps at batch 8) = {bound:.2f}x; "
            f"{ideal:.2f}x even if a batch-8 step cost what a batch-1 step does (timed at another moment than the "
            "phases on a shared machine: a measured ratio can land on either side).", "",
            "Reading the full-width rows. Host work (token choice, callbacks, cache rows) is under a millisecond "
            "a step, and HTTP + scheduling cost at most what the tiny rows show per token: at full width the "
            "time is the model's compute on 2 CPU cores. A decode step at batch 8 costs "
            f"{d8 / d1:.1f}x one at batch 1, all of it in the model call: MindSpore's CPU MatMul runs the one-row "
            f"product at memory speed but the 8-row product at {ms['ffn matmul 8'] / ms['ffn matmul 1']:.1f}x its "
            "time (the FFN row), so decode is not memory-bound at batch 8 on this machine. A short prompt's "
            f"prefill is compute-bound (8 prompts together cost {ms['prefill 8'] / prefill:.1f}x one) and is "
            f"{share:.0%} of a request's work alone, so even perfect decode batching "
            + ("stays under 4x (the estimate above): scheduling alone cannot reach the 4x target here for this "
               "workload. " if ideal < 4 else f"reaches only {ideal:.2f}x (the estimate above). ")
            + "Time to first token: requests arriving together (the c=8 phase starts with 8) need one prefill each "
            "of compute before the last first token; one by one, the median waits for 4.5 of them. Grouped "
            "prefills cost less per prompt (the prefill row) and later arrivals spread out, which brings the "
            "measured ratio nearer 2x, but bursts keep it above. "
            "What the scheduler does: prompts are prefilled between decode steps in chunks of at most "
            "--max-prefill-tokens tokens (short prompts grouped), so a running stream pauses one chunk per token, "
            "not for every queued prompt.", ""]


# ---- the client side ---------------------------------------------------------------------------------------
def start(cmd: List[str], timeout: float = 900) -> Tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found: List[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            m = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
            if m and not found:
                found.append(m.group(1))
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout):
        proc.kill()
        raise RuntimeError(f"the server did not start: {' '.join(cmd)}")
    return proc, found[0]


def stream_request(url: str, prompt: str, max_tokens: int) -> Tuple[float, int]:
    """(seconds to the first content chunk, completion tokens) of one streaming request."""
    host, port = url[len("http://"):].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=3600)
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    ttft, tokens = None, 0
    for line in resp:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        data = json.loads(line[len(b"data: "):])
        if data.get("usage"):
            tokens = data["usage"]["completion_tokens"]
        if ttft is None and any(c["delta"].get("content") for c in data.get("choices", [])):
            ttft = time.perf_counter() - sent
    conn.close()
    return (ttft if ttft is not None else time.perf_counter() - sent), tokens


def phase(url: str, clients: int, requests: int, max_tokens: int, tag: str) -> Dict[str, float]:
    def client(i: int) -> List[Tuple[float, int]]:
        return [stream_request(url, f"{tag} client {i} request {k}: tell me a story about the number {i * 7 + k}.",
                               max_tokens) for k in range(requests)]

    start_t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - start_t
    tokens = sum(t for _, t in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall": wall,
            "tokens_per_s": tokens / wall, "ttft": statistics.median(t for t, _ in results),
            "ttft_max": max(t for t, _ in results)}


def run_server(name: str, cmd: List[str], requests: int, max_tokens: int) -> List[Dict[str, float]]:
    print(f"[{name}] starting: {' '.join(cmd)}", flush=True)
    proc, url = start(cmd)
    try:
        phase(url, 2, 1, 4, "warm-up")  # the compilations (GRAPH mode) and the first allocations
        rows = []
        for c in CONCURRENCY:
            row = phase(url, c, requests, max_tokens, f"c{c}")
            print(f"[{name}] concurrency {c}: {row['tokens']} tokens in {row['wall']:.1f} s = "
                  f"{row['tokens_per_s']:.1f} tokens/s, TTFT median {row['ttft']:.2f} s", flush=True)
            rows.append(row)
        return rows
    finally:
        proc.terminate()
        proc.wait(120)


def section(results: Dict[str, List[Dict[str, float]]], args, load_before: float,
            profile: List[str]) -> Tuple[str, List[str]]:
    lines = ["## Serving: continuous batching (`python benchmarks/bench_serve.py`)", "",
             f"`ms-xcomposer serve` subprocess on 127.0.0.1, {args.mode} mode, --max-batch 16, --max-prefill-tokens "
             f"{args.max_prefill_tokens or 'default'}; c clients each send "
             f"{args.requests} streaming text-only requests in turn (short prompts, greedy, max_tokens "
             f"{args.max_tokens} tiny / {args.max_tokens_full} full-width). tokens/s = completion tokens / phase "
             "wall time; TTFT = median time to the first content chunk.", "",
             f"Machine: {_report.machine_line(load_before)}", ""]
    verdicts = []
    for name, rows in results.items():
        base = rows[0]
        table_rows = [[r["clients"], r["requests"], r["tokens"], f"{r['wall']:.1f}", f"{r['tokens_per_s']:.1f}",
                       f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x", f"{r['ttft']:.2f}",
                       f"{r['ttft'] / base['ttft']:.2f}x"] for r in rows]
        lines += [f"### {name}", "", _report.table(
            ["concurrency", "requests", "tokens", "wall s", "tokens/s", "vs c=1", "TTFT s", "TTFT vs c=1"],
            table_rows), ""]
        c8 = next(r for r in rows if r["clients"] == 8)
        speedup, ttft_ratio = c8["tokens_per_s"] / base["tokens_per_s"], c8["ttft"] / base["ttft"]
        if name == "tiny":
            verdicts.append(f"tiny: tokens/s at concurrency 8 >= 2.5x concurrency 1 | "
                            f"{_report.verdict(speedup >= 2.5)} | {speedup:.2f}x")
        else:
            verdicts.append(f"full-width: tokens/s at concurrency 8 >= 4x concurrency 1 | "
                            f"{_report.verdict(speedup >= 4.0)} | {speedup:.2f}x")
            verdicts.append(f"full-width: TTFT at concurrency 8 <= 2x concurrency 1 | "
                            f"{_report.verdict(ttft_ratio <= 2.0)} | {ttft_ratio:.2f}x")
        per_request_s = base["wall"] / base["requests"]
        decode_ms = (per_request_s - base["ttft"]) / max(base["tokens"] / base["requests"] - 1, 1) * 1e3
        lines += [f"Alone (c=1): the first token after {base['ttft']:.2f} s (queue + prefill of a short prompt), "
                  f"then {decode_ms:.0f} ms per token.", ""]
    lines += profile
    lines += ["Targets:", "", "| target | result | measured |", "|---|---|---|"]
    lines += [f"| {v} |" for v in verdicts]
    return "\n".join(lines) + "\n", verdicts
    return "\n".join(lines) + "\n", verdicts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", default="graph", choices=("graph", "pynative"))
    parser.add_argument("--only", choices=("tiny", "full-width", "profile"))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--requests", type=int, default=2, help="requests per client per phase")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of the tiny model's requests")
    parser.add_argument("--max-tokens-full", type=int, default=16, help="max_tokens on the full-width layers")
    parser.add_argument("--max-prefill-tokens", type=int, help="the servers' --max-prefill-tokens (default theirs)")
    parser.add_argument("--profile", action="store_true",
                        help="also time the engine's pieces on the full-width model (prefill, decode steps, host "
                             "work, the FFN product) in this process, after the servers")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--serve-full-width", metavar="TOKENIZER_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_full_width:
        serve_full_width(args.serve_full_width, args.layers, args.mode, 16, args.max_prefill_tokens)
        return 0

    from ms_xcomposer.conversion.convert import convert

    load_before = _report.load_average()
    env_python = [sys.executable]
    prefill_arg = [] if args.max_prefill_tokens is None else ["--max-prefill-tokens", str(args.max_prefill_tokens)]
    results: Dict[str, List[Dict[str, float]]] = {}
    profile: List[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = os.path.join(tmp, "tiny")
        convert(TINY_HF, tiny)
        if args.only in (None, "tiny"):
            results["tiny"] = run_server("tiny", env_python + [
                "-m", "ms_xcomposer", "serve", tiny, "--port", "0", "--served-model-name", MODEL_ID,
                "--max-batch", "16", "--max-queue", "256", "--mode", args.mode, *prefill_arg], args.requests,
                args.max_tokens)
        if args.only in (None, "full-width"):
            results[f"full-width ({args.layers} InternLM2 layers)"] = run_server("full-width", env_python + [
                os.path.abspath(__file__), "--serve-full-width", tiny, "--layers", str(args.layers),
                "--mode", args.mode, *prefill_arg], args.requests, args.max_tokens_full)
        if args.profile or args.only == "profile":
            profile = profile_lines(engine_profile(tiny, args.layers, args.mode), args)
            print("\n".join(profile), flush=True)
    body, verdicts = section(results, args, load_before, profile)
    print(body)
    if not args.no_write:
        print("wrote", _report.write_section("serve", body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
