#!/usr/bin/env python
"""Loading speed and memory: `XComposer2ForCausalLM.from_pretrained` vs the converter, on a synthetic full-width
checkpoint (IXC-2.5 7B tensor shapes, bf16, random: vocab 92544 x 4096 embeddings and output, CLIP-L/14-560
tower, task adapters, `--layers` full decoder layers; 3.4 GB with 2 layers).

Sources: the HF directory as `.bin` (3 torch-zip shards) and as safetensors (2 shards), and the converter's
`.ckpt` directory. Each is loaded with dtype=None (bf16 upcast once to fp32 on CPU) and dtype="bfloat16", in a
fresh process, timed from the call to the end of one short forward (so no read can hide behind it):

    load GB/s      = stored bytes / seconds
    converter GB/s = the same bytes / `convert` seconds (library call in a fresh process; the .ckpt source is
                     compared with the conversion that wrote it)
    peak RSS       = the process's peak (VmHWM), MindSpore and the runtime included

Targets (issue 10, printed PASS/FAIL): load >= 0.5x the converter's throughput; peak RSS <= loaded weights +
1 GB + the largest loaded tensor. Files are read warm (the page cache holds them: both sides read the same
bytes just before). Every conversion and every load runs `--repeat` times in the same run, interleaved (convert,
load, load, convert, ...), and the fastest of each is compared: on this shared VM one run's time varies 2-3x
with the other processes (the converter 5.2-21.5 s for the same bytes), the best of N much less. Peak RSS is
the largest of the N. Writes the `load` section of docs/performance.md.

    python benchmarks/bench_load.py             # 2 layers (3.4 GB per source form), ~15 min on 2 cores
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import _report  # noqa: E402

GB = 1e9

CONVERT = r"""
import json, sys
from ms_xcomposer.conversion.convert import convert
r = convert(sys.argv[1], sys.argv[2], allow_missing_tokenizer=True)  # random weights, no tokenizer
print(json.dumps({"bytes": r.bytes_read, "seconds": r.seconds}))
"""

LOAD = r"""
import json, os, sys, time
os.environ.setdefault("GLOG_v", "3")
from ms_xcomposer import runtime
from ms_xcomposer.memory import peak_rss, reset_peak_rss
runtime.setup("CPU", "pynative")
import numpy as np
from ms_xcomposer.models.xcomposer2 import XComposer2ForCausalLM

src, dtype = sys.argv[1], (sys.argv[2] if sys.argv[2] != "None" else None)
t0 = time.perf_counter()
model = XComposer2ForCausalLM.from_pretrained(src, dtype=dtype)
t1 = time.perf_counter()
peak_load = peak_rss()
reset_peak_rss()
model(input_ids=[[1, 2, 3]]).logits.asnumpy()
t2 = time.perf_counter()
sizes = [int(np.prod(p.shape)) * p.itemsize for _, p in model.parameters_and_names()]
print(json.dumps({"load": t1 - t0, "forward": t2 - t1, "peak": peak_load, "peak_forward": peak_rss(),
                  "weights": sum(sizes), "largest": max(sizes)}))
"""


def child(script: str, *args: str) -> Dict[str, float]:
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"child failed ({run.returncode}): {run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def warm(path: str) -> None:
    """Read every file under `path` once, so both sides start from the page cache."""
    for dirpath, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                while f.read(64 << 20):
                    pass


def stored_bytes(path: str) -> int:
    from ms_xcomposer.conversion.readers import open_checkpoint

    with open_checkpoint(path) as r:
        return sum(r.nbytes(k) for k in r.keys())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers at full width (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each conversion and load (default 3)")
    parser.add_argument("--workdir", default="/tmp", help="where the temporary checkpoints go (default /tmp)")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/performance.md")
    args = parser.parse_args()

    from ms_xcomposer.conversion.synthetic import write_random_hf_checkpoint
    from ms_xcomposer.models.xcomposer2.config import preset

    load_before = _report.load_average()
    base = preset("ixc2.5-7b")
    config = dataclasses.replace(base, llm=dataclasses.replace(base.llm, num_hidden_layers=args.layers))
    work = tempfile.mkdtemp(prefix="ms_xcomposer_bench_load_", dir=args.workdir)
    rows: List[List[object]] = []
    checks = []
    try:
        sources: Dict[str, str] = {}
        for fmt, shards in (("bin", 3), ("safetensors", 2)):
            sources[fmt] = os.path.join(work, f"hf_{fmt}")
            write_random_hf_checkpoint(sources[fmt], config, fmt=fmt, shards=shards)
        convert_s: Dict[str, List[float]] = {"bin": [], "safetensors": []}
        converted_bytes: Dict[str, int] = {}
        loads: Dict[tuple, List[Dict[str, float]]] = {}
        for rep in range(args.repeat):
            for fmt in ("bin", "safetensors"):
                # the first conversion of the .bin directory is the .ckpt source; the others are thrown away
                keep = fmt == "bin" and rep == 0
                dst = os.path.join(work, "ckpt" if keep else "scratch")
                warm(sources[fmt])
                r = child(CONVERT, sources[fmt], dst)
                print(f"convert {fmt} #{rep + 1}: {json.dumps(r)}", flush=True)
                convert_s[fmt].append(r["seconds"])
                converted_bytes[fmt] = r["bytes"]
                if keep:
                    sources["ckpt"] = dst
                else:
                    shutil.rmtree(dst)
            for fmt in ("ckpt", "safetensors", "bin"):
                for dtype in ("None", "bfloat16"):
                    warm(sources[fmt])
                    r = child(LOAD, sources[fmt], dtype)
                    print(f"load {fmt} dtype={dtype} #{rep + 1}: {json.dumps(r)}", flush=True)
                    loads.setdefault((fmt, dtype), []).append(r)
        convert_s["ckpt"], converted_bytes["ckpt"] = convert_s["bin"], converted_bytes["bin"]  # the conversion
        for fmt in ("ckpt", "safetensors", "bin"):  # that wrote the .ckpt directory
            size = stored_bytes(sources[fmt])
            conv_best = min(convert_s[fmt])
            conv_rate = converted_bytes[fmt] / conv_best / GB
            for dtype in ("None", "bfloat16"):
                runs = loads[(fmt, dtype)]
                r = min(runs, key=lambda x: x["load"] + x["forward"])
                seconds = r["load"] + r["forward"]
                peak = max(x["peak"] for x in runs)
                rate = size / seconds / GB
                limit = r["weights"] + 1 * GB + r["largest"]
                speed_ok, memory_ok = rate >= 0.5 * conv_rate, peak <= limit
                checks += [speed_ok, memory_ok]
                spread = ", ".join(f"{x['load'] + x['forward']:.1f}" for x in runs)
                rows.append([fmt, "fp32 (upcast)" if dtype == "None" else "bf16", f"{size / GB:.2f}",
                             f"{r['load']:.1f} + {r['forward']:.1f}", spread, f"{rate:.2f}",
                             f"{conv_best:.1f} ({', '.join(f'{x:.1f}' for x in convert_s[fmt])})",
                             f"{conv_rate:.2f}", f"{rate / conv_rate:.2f}x {_report.verdict(speed_ok)}",
                             f"{r['weights'] / GB:.2f}", f"{peak / GB:.2f}",
                             f"{limit / GB:.2f} {_report.verdict(memory_ok)}",
                             f"{max(x['peak_forward'] for x in runs) / GB:.2f}"])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = _report.table(["source", "loaded as", "stored GB", "best load + forward s", f"all {args.repeat} runs s",
                           "GB/s", "converter s: best (all)", "converter GB/s",
                           "ratio (>= 0.5)", "weights GB", "loading peak RSS GB",
                           "limit: weights + 1 GB + largest", "forward peak RSS GB"], rows)
    body = f"""## Loading (`benchmarks/bench_load.py`)

`XComposer2ForCausalLM.from_pretrained` of a synthetic full-width IXC-2.5 checkpoint ({args.layers} decoder
layers, the 7B vocabulary, CLIP-L/14-560, task adapters; random bf16), timed to the end of one short forward, in a
fresh process per row, files in the page cache; against `convert` of the same bytes (the .ckpt row: the
conversion that wrote it). Parameters are created unallocated; each tensor is read once into its own buffer
(converted block by block when a dtype is asked: bf16 -> fp32 by a 16-bit shift) and handed to MindSpore
with `Tensor.from_numpy` (no copy). Peak RSS is the whole process's (MindSpore's runtime included), during
`from_pretrained`; the forward's own peak is the last column: with bf16 weights on CPU (not the default there)
every call casts the weights it uses to fp32, the 92544-row embedding table (no bf16 gather kernel) and head
included, which costs the forward seconds and 2 x 1.5 GB.

{table}

Each row is the fastest of {args.repeat} runs in this run (all of them listed), against the fastest of the
converter's {args.repeat} runs of the same bytes (listed too): single runs on this shared VM vary 2-3x.
Where the fp32 upcast's time goes (cProfile of one .ckpt load, 18.3 s, load average 4): 15.3 s in the
bf16 -> fp32 shift (`readers.convert_into`), 2.3 s reading (`preadv`), 0.04 s handing tensors to MindSpore
(`from_numpy`); the protobuf scan does not show. The shift runs at 3.5 GB/s of input into memory already
touched (16 MB blocks); in the load it writes 6.7 GB of freshly allocated memory, and on this VM the first
touch of new pages is what costs: 3 GiB first-touched in 0.8 to 14 s from one run to the next (numpy arrays,
the same script), the same 0.45 GB/s the upcast shows. The bf16 rows touch half as much new memory and the
converter almost none (it maps its input and writes a file), so the fp32 rows' ratio moves with the VM.
Tried against that (2026-12-07, load average 1-3), none of them a reliable gain: filling 3 GiB of fresh fp32
memory from bf16 bits took 0.74 / 6.4 s as numpy allocates it (transparent huge pages), 2.0 / 2.0 s with numpy's
huge-page advice off, 2.4 / 3.0 s pre-faulted with MADV_POPULATE_WRITE, 2.8 / 4.1 s with two threads; converting
straight from memory maps of the shards instead of through the 16 MB read buffer loaded fp32 in 9.7 / 10.8 /
12.2 s (ckpt / safetensors / bin, best of 3) against 15.0 / 11.1 / 12.0 s for the buffered read in the next run,
with a higher peak (7.9 GB: the mapped pages count), so the buffered read stays.

Before (issue 10, 4 decoder layers, 4.09 GB bf16): 47 s with dtype="bfloat16" (0.09 GB/s, peak 6.7 GB), 79 s
with the fp32 upcast (peak 11.8 GB); the converter 0.48 GB/s.

Machine: {_report.machine_line(load_before)}.
"""
    print(body)
    if not args.no_write:
        print("wrote", _report.write_section("load", body))
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
