#!/usr/bin/env python
"""Vision speed: full-size CLIP ViT-L/14 tower + projector, MindSpore GRAPH and PyNative vs the PyTorch reference.

Random fp32 weights (`ReferenceXComposer2.random_state_dict`) are copied into both models; the language model
is cut to no layers (it is not used). Each case runs the models' own image path, `encode_img(pixels)`:
the ViT over every view, (HD variants) the 2x2 merge and separator layout, then `vision_proj`.

Cases:
- `336`: one 336x336 view, the stored 24x24 position grid (CLIP-L/14-336), projector 1024 -> 4096 -> 4096;
- `490`: IXC2-VL's input, one 490x490 view (its checkpoint stores the 35x35 grid);
- `560hd4`: IXC-2.5 with hd_num 4 on a square 1120x1120 image: global view + 2x2 tiles = 5 views of 560,
  merged 40x40 -> 20x20 x 4096, projector 4096 -> 4096 -> 4096.

The implementations run interleaved (GRAPH, PyTorch, PyNative, GRAPH, ...) after one warm-up call each (the
GRAPH warm-up includes its compilation, reported apart; at 560hd4, one call of a few minutes, only GRAPH warms
up); each case runs in its own process. Reported: median wall seconds, the ratio to PyTorch,
and CPU-seconds per call (all threads; less sensitive to other processes' load than wall time). Targets:
GRAPH <= 1.0x PyTorch, PyNative <= 2.0x PyTorch. Writes the `vision` section of docs/performance.md.

    python benchmarks/bench_vision.py                    # all cases (~9 min on 2 cores, 15 GB peak)
    python benchmarks/bench_vision.py --cases 336 --rounds 5

`--memory` instead measures the vision side's memory at hd_num 24 (IXC-2.5, CLIP-L/14-560, a 4 x 6 tile grid:
25 views of 1601 tokens, random fp32 weights): the peak RSS of one `encode_img` above the RSS before it (after a
warm-up call on a 1 x 1 grid that compiles the graphs), all 25 views in one tower call against groups of
`config.VISION_GROUP`, each in a fresh process, GRAPH mode. Writes the `vision_memory` section.

    python benchmarks/bench_vision.py --memory           # 24 tower layers, ~2 x 6 min on 2 cores
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _report  # noqa: E402

# case -> (preset, image size, tile size, default rounds, PyNative by default, description)
CASES = {
    "336": ("ixc2-vl-7b", 336, 336, 3, True, "336x336, 1 view (577 tokens), stored grid"),
    "490": ("ixc2-vl-7b", 490, 490, 2, True, "490x490 IXC2-VL, 1 view (1226 tokens), its stored 35x35 grid"),
    "560hd4": ("ixc2.5-7b", 1120, 560, 1, False,
               "IXC-2.5 hd_num 4: global + 2x2 tiles, 5 views of 560 (1601 tokens each)"),
}


def build_models(preset_name: str, tile: int, seed: int = 0):
    """(MindSpore model, PyTorch reference): full CLIP-L tower + projector, no LLM layers, same weights."""
    import mindspore as ms

    from ms_xcomposer.models.xcomposer2.config import preset
    from ms_xcomposer.models.xcomposer2 import XComposer2ForCausalLM
    from ms_xcomposer.reference.model import ReferenceXComposer2
    from ms_xcomposer.weights import DictSource, load_weights

    base = preset(preset_name)
    cfg = dataclasses.replace(
        base, llm=dataclasses.replace(base.llm, num_hidden_layers=0, vocab_size=16),
        vision=dataclasses.replace(base.vision, image_size=tile),
        task_adapters=())
    ref = ReferenceXComposer2.from_pretrained(ReferenceXComposer2.random_state_dict(cfg, seed), cfg)
    model = XComposer2ForCausalLM(cfg, dtype=ms.float32, compute_dtype=ms.float32)
    load_weights(model, DictSource({k: v.numpy() for k, v in ref.state_dict().items()}))
    return model, ref


def run_case(name: str, rounds: int, pynative: bool) -> Dict[str, object]:
    import mindspore as ms
    import torch

    preset_name, size, tile = CASES[name][:3]
    model, ref = build_models(preset_name, tile)
    pixels = np.random.default_rng(1).standard_normal((1, 3, size, size)).astype(np.float32)

    outputs: Dict[str, np.ndarray] = {}

    def ms_call(ctx, name):
        def call():
            ms.set_context(mode=ctx)
            outputs[name] = model.encode_img(pixels).asnumpy()
        return call

    @torch.no_grad()
    def torch_call():
        outputs["PyTorch"] = ref.encode_img(torch.from_numpy(pixels)).numpy()

    candidates = {"MindSpore GRAPH": ms_call(ms.GRAPH_MODE, "MindSpore GRAPH"), "PyTorch": torch_call}
    if pynative:
        candidates["MindSpore PyNative"] = ms_call(ms.PYNATIVE_MODE, "MindSpore PyNative")
    t = time.perf_counter()
    candidates["MindSpore GRAPH"]()  # compiles
    compile_s = time.perf_counter() - t
    if rounds > 1:  # first-call allocations of the others; skipped where one call takes minutes (560hd4)
        for name in list(candidates)[1:]:
            candidates[name]()
    wall, cpu = _report.interleaved(candidates, rounds, warmup=0)
    ms.set_context(mode=ms.GRAPH_MODE)
    max_diff = float(np.abs(outputs["MindSpore GRAPH"] - outputs["PyTorch"]).max())
    return {"wall": wall, "cpu": cpu, "compile_s": compile_s, "max_diff": max_diff,
            "tokens": int(outputs["PyTorch"].shape[1])}


def profile_case(case: str) -> str:
    """One GRAPH and one PyNative call under MindSpore's profiler, one PyTorch call under torch.profiler: op
    time by kind."""
    import mindspore as ms
    import torch

    preset_name, size, tile = CASES[case][:3]
    model, ref = build_models(preset_name, tile)
    pixels = np.random.default_rng(1).standard_normal((1, 3, size, size)).astype(np.float32)
    ms.set_context(mode=ms.GRAPH_MODE)
    model.encode_img(pixels).asnumpy()  # compile
    with torch.no_grad():
        ref.encode_img(torch.from_numpy(pixels))
    torch_run = _report.torch_op_times(lambda: ref.encode_img(torch.from_numpy(pixels)))
    graph = _report.op_kind_table(_report.ms_op_times(lambda: model.encode_img(pixels).asnumpy()), torch_run)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    model.encode_img(pixels).asnumpy()  # first-call allocations
    pynative = _report.op_kind_table(_report.ms_op_times(lambda: model.encode_img(pixels).asnumpy()), torch_run)
    ms.set_context(mode=ms.GRAPH_MODE)
    return f"GRAPH:\n\n{graph}\n\nPyNative:\n\n{pynative}"


def child(case: str, rounds: int, pynative: bool, profile: bool = False) -> None:
    """Runs one case (or its profile) in this (fresh) process and prints the result as one JSON line."""
    _report.setup_mindspore("graph")
    res = {"profile": profile_case(case)} if profile else run_case(case, rounds, pynative)
    print("RESULT " + json.dumps(res), flush=True)


def run_in_child(case: str, rounds: int, pynative: bool, profile: bool = False) -> Dict[str, object]:
    """Each case in its own process: MindSpore's memory pool keeps its peak (~9 GB of activations for the 5
    views at 560), so cases in one process would add up."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case, "--rounds", str(rounds)]
    if not pynative:
        cmd.append("--no-pynative")
    if profile:
        cmd.append("--profile-child")
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"case {case} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    usage = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    res["peak_rss_gb"] = usage  # the largest child so far
    return res


MEMORY_GRID = (4, 6)  # hd_num 24: 24 tiles + the global view


def memory_case(group: int, layers: int) -> Dict[str, float]:
    """Peak RSS rise and wall seconds of one hd_num-24 `encode_img` with `group` views per tower call."""
    import mindspore as ms
    import psutil

    from ms_xcomposer.memory import peak_rss, reset_peak_rss
    from ms_xcomposer.models.xcomposer2 import FAMILY, XComposer2ForCausalLM
    from ms_xcomposer.models.xcomposer2.config import preset
    from ms_xcomposer.weights import DictSource, load_weights

    base = preset("ixc2.5-7b")
    cfg = dataclasses.replace(base, llm=dataclasses.replace(base.llm, num_hidden_layers=0, vocab_size=16),
                              vision=dataclasses.replace(base.vision, num_hidden_layers=layers), task_adapters=())
    model = XComposer2ForCausalLM(cfg, dtype=ms.float32, compute_dtype=ms.float32)
    rng = np.random.default_rng(0)
    load_weights(model, DictSource({k: rng.standard_normal(tuple(shape), dtype=np.float32) * 0.02
                                    for k, shape in FAMILY.parameter_shapes(cfg).items()}))
    model.vision_group = group
    tile = cfg.tile_size
    model.encode_img(rng.standard_normal((1, 3, tile, tile), dtype=np.float32)).asnumpy()  # compiles
    pixels = rng.standard_normal((1, 3, MEMORY_GRID[0] * tile, MEMORY_GRID[1] * tile), dtype=np.float32)
    before = psutil.Process().memory_info().rss
    reset_peak_rss()
    start = time.perf_counter()
    tokens = model.encode_img(pixels).shape[1]
    seconds = time.perf_counter() - start
    return {"rise": peak_rss() - before, "seconds": seconds, "tokens": int(tokens), "graphs": model.compiled_graphs()}


def run_memory(layers: int, write: bool) -> int:
    from ms_xcomposer.config import VISION_GROUP
    from ms_xcomposer.memory import estimate
    from ms_xcomposer.models.xcomposer2.config import preset

    load_before = _report.load_average()
    views = 1 + MEMORY_GRID[0] * MEMORY_GRID[1]
    rows, results = [], {}
    for label, group in (("all views in one call (before)", views), (f"groups of {VISION_GROUP}", VISION_GROUP)):
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", str(group), "--vit-layers", str(layers)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            raise RuntimeError(f"memory case {group} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
        res = results[group] = json.loads(lines[-1][len("RESULT "):])
        print(label, res, flush=True)
        rows.append([label, group, f"{res['rise'] / 1e9:.2f}", f"{res['seconds']:.1f}", res["tokens"], res["graphs"]])
    est = estimate(preset("ixc2.5-7b"), prompt_rows=1, max_new_tokens=1, compute_dtype="float32",
                   weight_dtype="float32", weight_bytes=0, image_grids=[MEMORY_GRID])
    table = _report.table(["vision tower calls", "views per call", "peak RSS above before GB", "wall s",
                           "image tokens", "graphs compiled (tower, projector)"], rows)
    ok = results[VISION_GROUP]["rise"] < results[views]["rise"]
    layers_note = "" if layers == 24 else (
        f" Measured with {layers} of the tower's 24 layers (the run at 24 takes about 12x as long). The GRAPH peak "
        "grows with the layer count: one run of the grouped row at 24 layers (2026-12-07, load average 1.6-6.5) "
        "rose 4.97 GB (419 s); all views at once at 24 layers was not run (above the 13.3 GB it needs at 2 layers).")
    body = f"""## Vision memory at hd_num 24 (`python benchmarks/bench_vision.py --memory`)

One `encode_img` of an IXC-2.5 image at hd_num 24 ({MEMORY_GRID[0]} x {MEMORY_GRID[1]} tiles + the global view =
{views} views of 1601 tokens) on the full-width vision side (CLIP-L/14-560, {layers} layers, width 1024, 16 heads;
projector 4096 -> 4096 -> 4096; random fp32 weights), GRAPH mode, each row in a fresh process after a warm-up
call on a 1 x 1 grid (which compiles both graphs): peak RSS of the call above the RSS before it. The tower
runs `XComposer2ForCausalLM.vision_group` views per call (`config.VISION_GROUP` = {VISION_GROUP}; the first
row sets it to all {views}, what the image path did before); the view count is a dynamic dimension, so both
rows compile the same two graphs.

{table}

The estimate `memory.estimate` gives this image's vision side now: {est.activation / 1e9:.2f} GB (the LLM
prefill term, 1 row, is smaller). {_report.verdict(ok)}: grouped below all-at-once.{layers_note}

Machine: {_report.machine_line(load_before)}.
"""
    print(body)
    if write:
        print("wrote", _report.write_section("vision_memory", body))
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default: per case)")
    parser.add_argument("--pynative", choices=("default", "all", "none"), default="default",
                        help="MindSpore PyNative: in the 336 and 490 cases (default), all cases, or none")
    parser.add_argument("--no-pynative", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--profile-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile", default="336", help="case profiled op by op in both frameworks ('' for none)")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/performance.md")
    parser.add_argument("--memory", action="store_true", help="measure the hd_num-24 vision memory instead")
    parser.add_argument("--vit-layers", type=int, default=24, help="tower layers for --memory (default 24)")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        _report.setup_mindspore("graph")
        print("RESULT " + json.dumps(memory_case(args.memory_child, args.vit_layers)), flush=True)
        return 0
    if args.memory:
        return run_memory(args.vit_layers, not args.no_write)
    if args.child:
        child(args.child, args.rounds, not args.no_pynative, args.profile_child)
        return 0
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; expected from {list(CASES)}")

    load_before = _report.load_average()
    rows: List[List[object]] = []
    checks: List[List[object]] = []
    notes: List[str] = []
    for case in cases:
        rounds = args.rounds or CASES[case][3]
        pynative = args.pynative == "all" or (args.pynative == "default" and CASES[case][4])
        res = run_in_child(case, rounds, pynative)
        wall, cpu = res["wall"], res["cpu"]
        base = _report.median(wall["PyTorch"])
        for impl in wall:
            med = _report.median(wall[impl])
            rows.append([case, impl, f"{med:.2f}", f"{med / base:.2f}x", f"{_report.median(cpu[impl]):.2f}",
                         f"{_report.median(cpu[impl]) / _report.median(cpu['PyTorch']):.2f}x", len(wall[impl])])
        g = _report.median(wall["MindSpore GRAPH"]) / base
        checks.append([f"{case}: GRAPH <= 1.0x PyTorch", _report.verdict(g <= 1.0), f"{g:.2f}x"])
        if "MindSpore PyNative" in wall:
            p = _report.median(wall["MindSpore PyNative"]) / base
            checks.append([f"{case}: PyNative <= 2.0x PyTorch", _report.verdict(p <= 2.0), f"{p:.2f}x"])
        notes.append(f"{case}: {CASES[case][5]}; {res['tokens']} image embeddings; GRAPH first call "
                     f"(compile + run) {res['compile_s']:.1f} s; max |GRAPH - PyTorch| = {res['max_diff']:.2e}; "
                     f"peak RSS of the case's process (both models) {res['peak_rss_gb']:.1f} GB")
        print(f"done {case}", flush=True)

    profile = run_in_child(args.profile, 1, False, profile=True)["profile"] if args.profile else ""
    main_table = _report.table(["case", "implementation", "wall s (median)", "vs PyTorch", "CPU s", "CPU vs PyTorch",
                                "rounds"], rows)
    check_table = _report.table(["target", "result", "measured"], checks)
    print(main_table)
    print(check_table)
    print("\n".join(notes))
    if profile:
        print(profile)
    if not args.no_write:
        body = "\n\n".join([
            "## Vision tower + projector (`python benchmarks/bench_vision.py`)",
            "Full-size CLIP ViT-L/14 (24 layers, width 1024) + projector, random weights, fp32, batch = the "
            "views of one image; each case in its own process. PyNative is measured at 336 and 490 (at 560 x 5 "
            "views one PyNative call takes as long as the rest of the case).\n\nMachine: "
            + _report.machine_line(load_before),
            main_table, check_table, "\n".join(f"- {n}" for n in notes),
        ] + ([f"### Where the time goes: case {args.profile}, one call each, op time by kind\n\n"
              "MindSpore profiler (op execution time per op type) against torch.profiler (self time of aten ops), "
              "same process, same weights.\n\n" + profile, VISION_ANALYSIS] if profile else []))
        print("wrote", _report.write_section("vision", body))
    return 0 if all(c[1] == "PASS" for c in checks) else 1


VISION_ANALYSIS = """What limits the GRAPH tower on this CPU, from the profile above: the matmuls, which are oneDNN
`brg_matmul:avx512_core` (fp32) in MindSpore against MKL sgemm in PyTorch. On the 577-row products of the
336 case oneDNN is slower, most on the N=1024 ones (q/k/v/out projections, fc2): in interleaved runs
577x1024 @ 1024x1024 took about 2x MKL's time and 577x4096 @ 4096x1024 about 1.6x, while 1024- to 1226-row
products are within 10% (`matmul` section). That is why 336 misses the target and 490 / 560hd4 (1226 and
5 x 1601 rows, where PyTorch's eager attention is also slower) meet it. The other ops are a small share
after the fixes (no per-call weight transposes, BiasAdd for biases); MindSpore's CPU LayerNorm is ~10x
PyTorch's but 4% of the call. The load average is printed with each table: under load (another process on
a core) PyTorch's OpenMP threads lose more than MindSpore's thread pool and the ratios move in MindSpore's
favour.

PyNative adds MindSpore's per-op dispatch on the Python thread: in the PyNative table the wall exceeds the op
time by that amount, and the head split / merge transposes become views made contiguous by a single-threaded
copy kernel (`Contiguous`, on the Python thread in a `perf` profile) before each BatchMatMul."""


if __name__ == "__main__":
    sys.exit(main())
