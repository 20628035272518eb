#!/usr/bin/env python
"""Check a converted model against PyTorch, stage by stage, and show where the two sides diverge.

    python examples/parity_check.py HF_DIR --ms-dir MS_DIR --image photo.jpg
    python examples/parity_check.py HF_DIR --image a.png --mode graph --steps 4 --json parity.json

The PyTorch side is the project's reference model (ms_xcomposer.reference) loaded from HF_DIR; the MindSpore
side is MS_DIR (default: HF_DIR itself, read directly). Needs torch and transformers
(`pip install 'ms-xcomposer[parity]'`). Exit status 0 when every stage is within tolerance, 1 otherwise, 2 on bad
input (a missing file, torch not installed: one line on stderr).
`ms-xcomposer parity` is the same check as a command; this script shows the library calls.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

os.environ.setdefault("GLOG_v", "3")  # quiet MindSpore's C++ log, before mindspore is imported


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", help="Hugging Face checkpoint directory (the PyTorch side)")
    parser.add_argument("--ms-dir", help="converted MindSpore directory (default: HF_DIR)")
    parser.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    parser.add_argument("--query", default="Describe this image.")
    parser.add_argument("--hd-num", type=int, help="HD tile budget (default: the variant's)")
    parser.add_argument("--steps", type=int, default=8, help="greedy steps compared")
    parser.add_argument("--mode", default="pynative", choices=("pynative", "graph"))
    parser.add_argument("--json", help="also write the report as JSON to this file")
    args = parser.parse_args(argv)

    from ms_xcomposer import runtime
    from ms_xcomposer.parity import run_parity

    runtime.setup("CPU", args.mode)
    try:
        report = run_parity(args.hf_dir, args.ms_dir, args.image, args.query, hd_num=args.hd_num,
                            steps=args.steps, force_reference=True)
    except (ValueError, OSError) as e:  # bad input, or torch missing: the library's message says what to do
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.format_table())
    if args.json:
        report.write_json(args.json)
    first = report.first_failure
    if first is None:
        worst = max((s for s in report.stages if s.stage != "greedy tokens"), key=lambda s: s.rel_frobenius)
        print(f"parity OK ({report.mode} mode): {len(report.stages)} stages; largest relative difference "
              f"{worst.rel_frobenius:.1e} at {worst.stage}; greedy tokens {report.tokens['mindspore']}")
        return 0
    print(f"parity FAILED: first diverging stage {first.stage!r} (max abs {first.max_abs:.3e}, "
          f"tolerance atol {first.tolerance[0]:.0e} + rtol {first.tolerance[1]:.0e} x |expected|)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
