#!/usr/bin/env python
"""Writes the `summary` section (every PASS/FAIL line found in the benchmark sections) and the `ascend` section
(what is expected to change on Ascend, and what has not been measured) of docs/performance.md.

Run it after the benchmarks: `python benchmarks/summary.py`.
"""
from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _report  # noqa: E402

ASCEND = """## On Ascend (not measured here)

No Ascend device was available: nothing in this file was measured on one. What is expected to change:

- **bf16 compute.** `runtime.compute_dtype()` picks bfloat16 on Ascend (CPU has no bf16 MatMul kernel in
  MindSpore 2.10). Weights stay bf16 as stored (half the bytes of the fp32 CPU runs), so decode reads half the
  bytes per token; the cube units make prefill and the vision tower compute-bound at a far higher rate.
- **Flash attention.** The port computes attention explicitly (scores, additive bias, softmax in fp32) so
  that CPU and GRAPH mode work everywhere; on Ascend `ops.flash_attention_score` (or
  `ops.prompt_flash_attention` / `incre_flash_attention` for decode) would avoid materialising the
  [heads, S, capacity] scores. Not wired in: it needs an Ascend-only code path and parity tests on hardware.
- **Static KV cache.** The cache is written with `tensor_scatter_elements` into fixed-capacity tensors and
  returned as new tensors; GRAPH mode compiles one dynamic-shape decode graph. On Ascend a static-shape decode
  graph (capacity fixed per generation) with in-place cache updates (`ops.scatter_update` on Parameters, or
  KV-cache ops) avoids dynamic-shape kernel selection per step and the cache copy; expected to matter more
  there than on CPU, where weights reads dominate (decode section).
- **Kernels.** Everything in the CPU findings (oneDNN vs MKL, the slow CPU Transpose) is CPU-specific; the
  `MatMul(transpose_b=True)` form of `layers.linear` is also the natural form for Ascend's MatMul.
- Not measured on Ascend: speed of any benchmark here, memory use, compile time, and numerical parity in bf16
  against the PyTorch reference.
"""


NOTE = """Each FAIL row is explained in its benchmark's section with an op-by-op profile of both frameworks
(vision: oneDNN matmuls on the 577-row products at 336; decode: oneDNN's one-row product against MKL's sgemv).
Ratios depend on the machine's load (last column; 2 cores): with another process on one of them, PyTorch's
OpenMP threads lose more than MindSpore's thread pool and the ratios move in MindSpore's favour, so the
conservative numbers are those taken at a load average near 1 or below."""


def main() -> int:
    text = open(_report.DOC, encoding="utf-8").read() if os.path.exists(_report.DOC) else ""
    lines = []
    for key, body in re.findall(r"<!-- BEGIN (\S+) -->\n(.*?)<!-- END \1 -->", text, flags=re.S):
        if key in ("summary", "ascend"):
            continue
        load = re.search(r"load average ([\d.]+) before, ([\d.]+) after", body)
        load_text = f"{load.group(1)} / {load.group(2)}" if load else "-"
        for row in body.splitlines():
            cells = [c.strip() for c in row.strip("|").split("|")]
            if len(cells) >= 3 and cells[1] in ("PASS", "FAIL"):
                lines.append(f"| {key} | {cells[0]} | {cells[1]} | {cells[2]} | {load_text} |")
    body = "## Targets\n\n" + ("| benchmark | target | result | measured | load avg before / after |\n"
                               "|---|---|---|---|---|\n" + "\n".join(lines)
                               + "\n\n" + NOTE if lines else "No benchmark section yet: run the scripts in benchmarks/.")
    print(body)
    _report.write_section("summary", body)
    print("wrote", _report.write_section("ascend", ASCEND))
    return 0


if __name__ == "__main__":
    sys.exit(main())
