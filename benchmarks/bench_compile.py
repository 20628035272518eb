#!/usr/bin/env python
"""GRAPH-mode compilation: how many graphs a 64-token chat turn compiles, and how long compiling takes.

Every graph compilation of any Cell goes through MindSpore's `_cell_graph_executor.compile`, which returns
whether it compiled (False when the graph was cached); the script wraps it to count compilations per Cell
class and time them. On a fresh model (tiny and mid configs of `bench_e2e.py`, random weights) it runs:
1. a chat turn with one image (hd_num 4) and 64 greedy new tokens (`max_new_tokens=64`; stop ids may end it
   earlier with random weights: the count is shown): the cold start;
2. the same turn again: nothing may compile;
3. a turn with another image size and a longer query: nothing may compile (the vision pieces and the language
   model's graphs have dynamic dimensions).
Writes the `compile` section of docs/performance.md.

    python benchmarks/bench_compile.py          # ~3 min on 2 cores
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _report  # noqa: E402
from bench_e2e import DATA, HD_NUM, IMAGE, QUERY, config  # noqa: E402

OTHER_IMAGE = os.path.join(DATA, "image_tall.png")


class CompileCounter:
    """Wraps `_cell_graph_executor.compile`: (Cell class, seconds) of every call that compiled."""

    def __init__(self):
        from mindspore.nn import cell

        self.executor = cell._cell_graph_executor
        self.original = self.executor.compile
        self.events: List[Tuple[str, float]] = []

        def compile(obj, *args, **kwargs):
            start = time.perf_counter()
            phase, compiled = self.original(obj, *args, **kwargs)
            if compiled:
                self.events.append((type(obj).__name__, time.perf_counter() - start))
            return phase, compiled

        self.executor.compile = compile

    def close(self) -> None:
        self.executor.compile = self.original

    def since(self, mark: int) -> Tuple[int, float, str]:
        events = self.events[mark:]
        kinds = collections.Counter(name for name, _ in events)
        return len(events), sum(s for _, s in events), ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,mid", help="comma-separated: tiny, mid")
    parser.add_argument("--new-tokens", type=int, default=64, help="max new tokens per turn (default 64)")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/performance.md")
    args = parser.parse_args()

    load_before = _report.load_average()
    _report.setup_mindspore("graph")
    import mindspore as ms

    from ms_xcomposer import XComposer2ForCausalLM, XComposer2Processor, chat_with_ids
    from ms_xcomposer.reference.model import ReferenceXComposer2
    from ms_xcomposer.tokenizer import InternLM2Tokenizer
    from ms_xcomposer.weights import DictSource, load_weights

    tok = InternLM2Tokenizer.from_pretrained(os.path.join(DATA, "hf"))
    counter = CompileCounter()
    rows: List[List[object]] = []
    checks: List[List[object]] = []
    try:
        for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
            cfg = config(name)
            state = ReferenceXComposer2.random_state_dict(cfg, 0)
            model = XComposer2ForCausalLM(cfg, dtype=ms.float32, compute_dtype=ms.float32)
            load_weights(model, DictSource({k: v.numpy() for k, v in state.items()}))
            processor = XComposer2Processor(tok, cfg)
            del state
            turns: Dict[str, Tuple[str, str]] = {
                "1. cold: image + 64 tokens": (QUERY, IMAGE),
                "2. same turn again": (QUERY, IMAGE),
                "3. other image size, longer query": (QUERY + " What colours and shapes are there?", OTHER_IMAGE),
            }
            counts = []
            for label, (query, image) in turns.items():
                mark = counter.since(0)[0]
                start = time.perf_counter()
                result = chat_with_ids(model, processor, query, images=[image], hd_num=HD_NUM, do_sample=False,
                                       repetition_penalty=1.0, max_new_tokens=args.new_tokens)
                total = time.perf_counter() - start
                n, seconds, kinds = counter.since(mark)
                counts.append(n)
                rows.append([name, label, len(result.ids), n, f"{seconds:.1f}", f"{total:.1f}", kinds or "-"])
            checks.append([f"{name}: the repeated turn compiles nothing", _report.verdict(counts[1] == 0),
                           f"{counts[1]} compilations"])
            print(f"done {name}", flush=True)
    finally:
        counter.close()
    main_table = _report.table(["config", "turn", "new tokens", "compilations", "compile s", "turn s",
                                "compiled Cells"], rows)
    check_table = _report.table(["check", "result", "measured"], checks)
    print(main_table)
    print(check_table)
    if not args.no_write:
        body = "\n\n".join([
            "## GRAPH compilation (`python benchmarks/bench_compile.py`)",
            "Counts every compilation through MindSpore's graph executor (any Cell), on a fresh model per config, "
            "IXC-2.5 chat turns, greedy. `DecoderStep` graphs have dynamic batch, sequence and cache dimensions: "
            "one with PLoRA (prefill with image rows) and one without (decode steps, text-only prefill) serve every "
            "length; `_ViTGroup` runs the HD views in groups (the view count dynamic) and `_VisionProject` takes "
            "any number of image tokens, so a new tile grid compiles nothing; `EmbedTokens` is the token-embedding "
            "piece the prompt builder and each decode step call (dynamic length; the mid config compiled it twice "
            "on 2026-12-07, cause not investigated).\n\nMachine: " + _report.machine_line(load_before),
            main_table, check_table,
        ])
        print("wrote", _report.write_section("compile", body))
    return 0 if all(c[1] == "PASS" for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
