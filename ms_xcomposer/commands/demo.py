"""`ms-xcomposer demo`: the whole pipeline on a tiny random model, with nothing but the install.

Steps: (1) create (or reuse) a tiny random checkpoint of the family (`--family`: xcomposer2, the default, an
IXC-2.5; llava; internvl) in the real HF layout in the cache directory, (2) convert it, (3) chat about the bundled
image in PyNative mode, (4) compare with the family's PyTorch side (the project's reference; transformers' Llava)
stage by stage when torch and transformers are installed and the family has a parity hook, (5) chat in GRAPH
mode (a first turn that compiles the graphs, then a follow-up whose new prompt length must not compile again).
Then a short report.
Exit 1 if a check fails: parity, PyNative and GRAPH answers identical, no recompilation for the follow-up.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import time
from typing import List, Optional, Tuple

from ms_xcomposer.cli import EXIT_CHECK_FAILED, EXIT_OK

# the keys of `ms_xcomposer.demo.DEMOS` (not imported here: argparse only)
DEMO_FAMILIES = ("xcomposer2", "llava", "internvl")

EXAMPLES = """examples:
  ms-xcomposer demo
  ms-xcomposer demo --cache-dir /tmp/xc-demo --max-new-tokens 4
  ms-xcomposer demo --no-parity          # skip the PyTorch comparison even when torch is installed
  ms-xcomposer demo --family llava       # a tiny random LLaVA-1.5 (llava-hf layout), transformers as PyTorch side
  ms-xcomposer demo --family internvl    # a tiny random InternVL-1.5 (InternVLChatModel layout)

The model is random (the `tiny-ixc2.5` preset: 2 decoder layers of width 256, a 2-layer CLIP tower, vocabulary
1000): its answers are meaningless text. The demo shows the pipeline working end to end and reports conversion
speed, tokens/s, parity figures and compiled graphs. The checkpoint is kept in the cache directory (default
~/.cache/ms-xcomposer/demo, or $XDG_CACHE_HOME/ms-xcomposer/demo; other families in a subdirectory named after
them) and reused while its files are unchanged. --family llava: CLIP 3 layers at 112 px (64 image tokens), LLaMA
2 layers of width 128, vocabulary 1002. --family internvl: InternViT (6B flavour) 2 layers of width 64 on 448-px
tiles (the 896x448 image: 2 tiles + thumbnail, 768 image tokens), InternLM2 2 layers of width 128, vocabulary 1015.
Runs on CPU; 20-40 s on 2 cores (30 s measured, with torch installed; longer when the machine is busy).
"""
QUERY = "Describe this image."
FOLLOW_UP = "What colour is the sky?"
PARITY_STEPS = 8


def _rate(tokens_per_s) -> str:
    return f"{tokens_per_s:.1f} tokens/s" if tokens_per_s is not None else "n/a tokens/s (a single token)"


def _turn_line(stats, compiled_note: str = "") -> str:
    return (f"{len(stats.ids)} new tokens in {stats.seconds:.1f} s: first token after {stats.first_token_s:.1f} s "
            f"(image encoding + prefill{compiled_note}), then {_rate(stats.decode_tokens_per_s)}")


def have_torch() -> bool:
    """Whether the optional PyTorch side (torch and transformers) is installed."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def parity_step(skip: bool, model, processor, hf_dir: str, hd_num: Optional[int],
                family: str = "xcomposer2") -> Tuple[str, Optional[str]]:
    """Step 4: compare `model` with the PyTorch side of `hf_dir` (the `Family.parity` hook of `family`) on the
    demo chat and print the table.

    Returns (the report's parity line, a failure message or None). Skipped, with the reason, when `skip`, when
    torch / transformers are not installed, or when the family has no parity hook.
    """
    from ms_xcomposer.families import family_named

    if skip or not have_torch() or family_named(family).parity is None:
        line = ("skipped (--no-parity)" if skip else
                "skipped: torch and transformers are not installed (pip install 'ms-xcomposer[parity]')"
                if not have_torch() else f"skipped: the {family} family has no stage-by-stage parity hook")
        print(f"[4/5] parity: {line}")
        return line, None
    from ms_xcomposer import demo
    from ms_xcomposer.parity import ParityRequest, parity_hook, tolerance_key

    spec = demo.DEMOS[family]
    weights, compute = tolerance_key(model)
    print(f"[4/5] parity with {spec.torch_side} (PyNative; {weights} weights, {compute} compute; a bf16 "
          "checkpoint is upcast once at load on CPU):", flush=True)
    request = ParityRequest(hf_dir, (demo.IMAGE,), QUERY, PARITY_STEPS, {} if hd_num is None else {"hd_num": hd_num})
    report = parity_hook(family_named(spec.family))(model, processor, request)
    print("\n".join("      " + line for line in report.format_table().splitlines()))
    numeric = [s for s in report.stages if s.tolerance != (0.0, 0.0)]  # token stages are identical or not
    worst_abs = max(numeric, key=lambda s: s.max_abs)
    worst_rel = max(numeric, key=lambda s: s.rel_frobenius)
    tokens = report.stage("greedy tokens")
    figures = (f"largest max abs diff {worst_abs.max_abs:.1e} ({worst_abs.stage}), largest rel Frobenius "
               f"{worst_rel.rel_frobenius:.1e} ({worst_rel.stage}), greedy tokens "
               f"{'identical' if tokens.passed else 'DIFFER'} over {PARITY_STEPS} steps")
    if report.passed:
        return f"pass: all {len(report.stages)} stages within tolerance; {figures}", None
    first = report.first_failure.stage
    return f"FAILED from stage {first}; {figures}", f"parity fails from stage {first}"


def run(args: argparse.Namespace) -> int:
    from ms_xcomposer import demo, runtime
    from ms_xcomposer.api import load
    from ms_xcomposer.conversion.convert import convert

    start = time.perf_counter()
    spec = demo.DEMOS[args.family]
    if args.hd_num is not None and "hd_num" not in spec.options:
        raise ValueError(f"--hd-num applies to the xcomposer2 demo, not to --family {args.family}")
    hd_num = args.hd_num if args.hd_num is not None or "hd_num" not in spec.options else 1
    cache_dir = os.path.abspath(os.path.expanduser(args.cache_dir or demo.default_cache_dir()))
    print(f"ms-xcomposer demo: {spec.model} in the real Hugging Face layout.")
    print("Its weights are random, so its answers are meaningless text: the demo shows the pipeline, not the model.")
    failures: List[str] = []

    ckpt = demo.ensure_checkpoint(cache_dir, rebuild=args.rebuild, family=args.family)
    why = f" ({ckpt.reason})" if ckpt.reason else ""
    print(f"[1/5] checkpoint {ckpt.status}{why} in {ckpt.seconds:.1f} s: {ckpt.hf_dir}")
    print(f"      {spec.files}")

    ms_dir = os.path.join(os.path.dirname(ckpt.hf_dir), "ms")
    conversion = convert(ckpt.hf_dir, ms_dir, overwrite=True)
    print(f"[2/5] converted {conversion.summary()}", flush=True)

    runtime.setup("CPU", "pynative")
    model, processor = load(ms_dir)
    tiles = "" if hd_num is None else f" (hd_num {hd_num})"
    print(f"[3/5] PyNative chat, {QUERY!r} about {os.path.basename(demo.IMAGE)}{tiles}:", flush=True)
    pynative = demo.timed_chat(model, processor, QUERY, [demo.IMAGE], hd_num, args.max_new_tokens)
    print(f"      answer: {pynative.response!r}")
    print(f"      {_turn_line(pynative)}")

    parity_line, parity_failure = parity_step(args.no_parity, model, processor, ckpt.hf_dir, hd_num, args.family)
    if parity_failure:
        failures.append(parity_failure)

    print("[5/5] GRAPH chat, the same question, then a follow-up (a longer prompt: the history):", flush=True)
    runtime.setup("CPU", "graph")  # the same model: its compiled pieces are built on their first GRAPH call
    print("      compiling the graphs (vision encoder, token embedding, language model step): a few seconds ...",
          flush=True)
    try:
        graph = demo.timed_chat(model, processor, QUERY, [demo.IMAGE], hd_num, args.max_new_tokens)
        follow = demo.timed_chat(model, processor, FOLLOW_UP, [demo.IMAGE], hd_num, args.max_new_tokens,
                                 history=graph.history)
    finally:
        runtime.setup("CPU", "pynative")
    print(f"      answer: {graph.response!r}")
    print(f"      {_turn_line(graph, f', compiling {graph.graphs} graphs')}")
    print(f"      follow-up {FOLLOW_UP!r}: {follow.response!r}")
    print(f"      {_turn_line(follow)}")
    same = graph.ids == pynative.ids
    if not same:
        failures.append("the GRAPH answer differs from the PyNative answer")
    if follow.graphs != graph.graphs:
        failures.append(f"the follow-up compiled {follow.graphs - graph.graphs} more graph(s)")

    print()
    print("report (a random model: the text is meaningless, the numbers are real)")
    print(f"  conversion        {conversion.gb_per_s:.2f} GB/s ({conversion.tensors} tensors, "
          f"{conversion.bytes_read / 1e6:.1f} MB in {conversion.seconds:.2f} s)")
    print(f"  PyNative          {_rate(pynative.decode_tokens_per_s)}, first token after {pynative.first_token_s:.1f} s")
    print(f"  GRAPH             {_rate(follow.decode_tokens_per_s)}, first token after {follow.first_token_s:.1f} s "
          f"(follow-up; the first turn took {graph.first_token_s:.1f} s with compilation)")
    print(f"  graphs compiled   {graph.graphs} in the first GRAPH turn, "
          f"{follow.graphs - graph.graphs} more for the follow-up")
    print(f"  PyNative = GRAPH  {'identical tokens' if same else 'DIFFERENT tokens'} ({len(pynative.ids)} tokens)")
    print(f"  parity            {parity_line}")
    print(f"  total             {time.perf_counter() - start:.1f} s")
    if failures:
        print("demo: FAILED: " + "; ".join(failures))
        return EXIT_CHECK_FAILED
    print("demo: OK")
    return EXIT_OK


def register(subparsers) -> None:
    from ms_xcomposer.commands.chat import positive_int

    parser = subparsers.add_parser(
        "demo", help="run the whole pipeline on a tiny random model (needs nothing but the install)",
        description="Create a tiny random checkpoint (IXC-2.5 by default, or --family llava / internvl) in the real HF "
                    "layout, convert it, chat about a bundled image in PyNative and GRAPH mode, compare with the "
                    "family's PyTorch side when torch is installed, and report speed, parity and compiled graphs.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="where the demo checkpoint is kept (default: ~/.cache/ms-xcomposer/demo)")
    parser.add_argument("--rebuild", action="store_true", help="recreate the checkpoint even if the cache is valid")
    parser.add_argument("--family", choices=sorted(DEMO_FAMILIES), default="xcomposer2",
                        help="the model family of the tiny model (default: %(default)s, an IXC-2.5)")
    parser.add_argument("--hd-num", type=positive_int, metavar="N",
                        help="xcomposer2: HD tile budget for the 896x448 image (default: 1 tile; 2 or more: 2 tiles, "
                             "a longer prompt)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=12, metavar="N",
                        help="new tokens per answer (default: 12)")
    parser.add_argument("--no-parity", action="store_true", help="skip the comparison with PyTorch")
    parser.set_defaults(func=run)
