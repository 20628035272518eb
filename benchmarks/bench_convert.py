#!/usr/bin/env python
"""Converter memory and speed on a synthetic full-width 7B-shaped checkpoint (IXC-2.5 layout, bf16).

For each source form (`.bin` torch pickles, 3 shards; safetensors, 2 shards) it writes a random checkpoint
with the real 7B tensor shapes (vocab 92544 x 4096 embeddings and output, full decoder layers, CLIP-L/14-560
tower, task adapters) but only `--layers` decoder layers, then measures in the same run:

- a plain file copy of the same shard files (`shutil.copyfile`, i.e. `cp`);
- `ms-xcomposer convert` to .ckpt (library call in a child process; its peak RSS and CPU time from `wait4`).

Both are measured with the source files' pages dropped from the page cache first ("cold": real 16-20 GB
checkpoints on machines with less memory than that are read from disk) and with them cached ("warm").
Copy and conversion alternate `--repeats` times and the best time of each counts (the machine may be shared:
best-of-N is the least noisy estimate and is applied to both sides). Every timed step starts after `sync`,
with the previous step's output deleted, so no step inherits another's dirty pages.

It prints throughput ratio = convert GB/s / copy GB/s (target >= 0.5, judged on the cold runs; the warm
ratio is printed too) and memory ratio = peak RSS / (1 GB + 2 x largest tensor) (target <= 1), with the CPU
seconds of both sides, and exits 1 if a target is missed. Everything lives in a temporary directory under
--workdir (default /tmp), removed at the end.

    python benchmarks/bench_convert.py            # 2 layers: 3.37 GB per form
    python benchmarks/bench_convert.py --layers 4 # 4.54 GB per form
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ms_xcomposer.models.xcomposer2 import FAMILY  # noqa: E402
from ms_xcomposer.models.xcomposer2.config import preset  # noqa: E402
from ms_xcomposer.conversion.synthetic import write_random_hf_checkpoint  # noqa: E402

GB = 1e9
CHILD = """
import json, sys
sys.path.insert(0, {root!r})
from ms_xcomposer.conversion.convert import convert
r = convert({src!r}, {dst!r}, fmt={fmt!r}, allow_missing_tokenizer=True)  # random weights, no tokenizer
print(json.dumps({{"tensors": r.tensors, "bytes": r.bytes_read, "seconds": r.seconds}}))
"""


def cpu_seconds(usage) -> float:
    return usage.ru_utime + usage.ru_stime


def prepare(files, cold: bool) -> None:
    """Flush dirty pages; for a cold run also drop the source files' cached pages (only ours)."""
    os.sync()
    if cold:
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def copy_throughput(files, dst_dir, cold: bool):
    """(GB/s, CPU seconds) of copying `files` into `dst_dir` (removed afterwards)."""
    prepare(files, cold)
    os.makedirs(dst_dir)
    cpu = cpu_seconds(resource.getrusage(resource.RUSAGE_SELF))
    start = time.perf_counter()
    for f in files:
        shutil.copyfile(f, os.path.join(dst_dir, os.path.basename(f)))
    seconds = time.perf_counter() - start
    cpu = cpu_seconds(resource.getrusage(resource.RUSAGE_SELF)) - cpu
    size = sum(os.path.getsize(f) for f in files)
    shutil.rmtree(dst_dir)
    return size / GB / seconds, cpu


def convert_in_child(src, dst, fmt, files, cold: bool):
    """(result dict, peak RSS bytes, CPU seconds) of a conversion run in a fresh interpreter."""
    prepare(files, cold)
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(root=ROOT, src=src, dst=dst, fmt=fmt)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"conversion failed ({proc.returncode}): {err.decode()[-2000:]}")
    return json.loads(out), usage.ru_maxrss * 1024, cpu_seconds(usage)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (full width); default 2")
    parser.add_argument("--workdir", default="/tmp", help="where the temporary files go (default /tmp)")
    parser.add_argument("--formats", default="bin,safetensors", help="source forms to measure")
    parser.add_argument("--repeats", type=int, default=2, help="copy/convert rounds per form (best counts)")
    args = parser.parse_args()

    base = preset("ixc2.5-7b")
    config = dataclasses.replace(base, llm=dataclasses.replace(base.llm, num_hidden_layers=args.layers))
    sizes = {k: int(np.prod(s)) * 2 for k, s in FAMILY.parameter_shapes(config).items()}
    largest = max(sizes.values())
    limit = 1 * GB + 2 * largest
    print(f"synthetic IXC-2.5 7B shapes, {args.layers} decoder layers: {len(sizes)} tensors, "
          f"{sum(sizes.values()) / GB:.2f} GB bf16, largest tensor {largest / GB:.3f} GB, "
          f"memory limit 1 GB + 2 x largest = {limit / GB:.2f} GB; {os.cpu_count()} CPUs")
    work = tempfile.mkdtemp(prefix="ms_xcomposer_bench_", dir=args.workdir)
    failed = False
    try:
        for fmt in args.formats.split(","):
            src = os.path.join(work, f"hf_{fmt}")
            t = time.perf_counter()
            files = write_random_hf_checkpoint(src, config, fmt=fmt, shards=3 if fmt == "bin" else 2)  # as released
            size = sum(os.path.getsize(f) for f in files)
            print(f"[{fmt}] wrote {len(files)} shards, {size / GB:.2f} GB in {time.perf_counter() - t:.0f} s")
            runs = {mode: {"copy": [], "convert": [], "copy_cpu": [], "convert_cpu": []} for mode in ("cold", "warm")}
            peak = 0
            for _ in range(args.repeats):
                for mode, r in runs.items():
                    rate, cpu = copy_throughput(files, os.path.join(work, "copy"), mode == "cold")
                    r["copy"].append(rate)
                    r["copy_cpu"].append(cpu)
                    result, rss, cpu = convert_in_child(src, os.path.join(work, "ms"), "ckpt", files, mode == "cold")
                    shutil.rmtree(os.path.join(work, "ms"))
                    r["convert"].append(result["bytes"] / GB / result["seconds"])
                    r["convert_cpu"].append(cpu)
                    peak = max(peak, rss)
            ratios = {}
            for mode, r in runs.items():
                copy, speed = max(r["copy"]), max(r["convert"])
                ratios[mode] = speed / copy
                print(f"[{fmt}] {mode}: plain copy {copy:.2f} GB/s (runs {', '.join(f'{c:.2f}' for c in r['copy'])}), "
                      f"convert {speed:.2f} GB/s (runs {', '.join(f'{c:.2f}' for c in r['convert'])}): "
                      f"ratio {ratios[mode]:.2f}; CPU s copy {min(r['copy_cpu']):.1f}, "
                      f"convert {min(r['convert_cpu']):.1f}")
            m_ratio = peak / limit
            ok = ratios["cold"] >= 0.5 and m_ratio <= 1.0
            failed |= not ok
            print(f"[{fmt}] {result['tensors']} tensors, {result['bytes'] / GB:.2f} GB; peak RSS {peak / GB:.2f} GB; "
                  f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
            print(f"[{fmt}] throughput ratio {ratios['cold']:.2f} cold (>= 0.5; warm {ratios['warm']:.2f}), "
                  f"memory ratio {m_ratio:.2f} (<= 1.0): {'PASS' if ok else 'FAIL'}")
            shutil.rmtree(src)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
