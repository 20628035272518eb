"""`ms-xcomposer parity HF_DIR`: run PyTorch and MindSpore on the same inputs and compare every stage."""
from __future__ import annotations

import argparse

from ms_xcomposer.cli import EXIT_CHECK_FAILED, EXIT_OK
from ms_xcomposer.commands.chat import add_runtime_arguments, positive_int

EXAMPLES = """examples:
  ms-xcomposer parity ./internlm-xcomposer2d5-7b --ms-dir ./ixc25-ms --image cat.png --steps 8
  ms-xcomposer parity tests/data/ixc25_tiny/hf --image tests/data/ixc25_tiny/image_wide.png --mode graph --json parity.json
                                          # the tiny golden model of a source checkout
  ms-xcomposer parity ./internlm-xcomposer2d5-7b --trust-remote-code --image cat.png
  ms-xcomposer parity ./llava-1.5-7b-hf --ms-dir ./llava-ms --image cat.png   # transformers' Llava as PyTorch side

Stages, in pipeline order, are the family's (docs/parity.md): the image side (XComposer2: pixels, vit input,
vision tower, assembled tokens, projector per image; LLaVA: pixels, prompt ids, vision layer L, projector),
then embeddings, layer 0 .. layer N-1, logits and greedy tokens. Each passes when every element is within the
tolerance of (MindSpore weight dtype, compute dtype); ids must be identical. A stage that misses it is
re-judged against the PyTorch side rerun in float64 when that fits in memory (ill-conditioned models: see
docs/parity.md); the rule column says which rule judged. The PyTorch side: XComposer2, the
project's reference, or HF_DIR's own remote code (modeling_*.py) with --trust-remote-code (a directory with
remote code is refused unless one of the two flags says which); LLaVA, transformers' LlavaForConditionalGeneration
and LlavaProcessor. Exit 0 if every stage passes, 1 if one fails (the first diverging stage is named), 2 on bad
input.
"""


def run(args: argparse.Namespace) -> int:
    from ms_xcomposer import runtime
    from ms_xcomposer.parity import check_request, run_parity

    check_request(args.hf_dir, args.image or (), args.steps, args.trust_remote_code, args.reference)
    runtime.setup(args.device, args.mode)
    report = run_parity(args.hf_dir, args.ms_dir, args.image or (), args.query, args.dtype, args.hd_num,
                        args.steps, trust_remote_code=args.trust_remote_code, force_reference=args.reference)
    key = report.tolerance_key
    print(f"PyTorch side: {report.torch_side}; MindSpore {report.mode} mode, {key[0]} weights, {key[1]} compute; "
          f"prompt {report.inputs['prompt_length']} rows ({report.inputs['image_tokens']} image)")
    print(report.format_table())
    if args.json:
        report.write_json(args.json)
    first = report.first_failure
    if first is None:
        print(f"parity: all {len(report.stages)} stages pass")
        return EXIT_OK
    failed = sum(not s.passed for s in report.stages)
    print(f"parity: FAILED ({failed} of {len(report.stages)} stages); first diverging stage: {first.stage}")
    return EXIT_CHECK_FAILED


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "parity", help="compare MindSpore with PyTorch stage by stage on the same inputs",
        description="Run the PyTorch model (the family's PyTorch side: the project's reference, transformers, or "
                    "HF_DIR's remote code) and the MindSpore port on one chat prompt and compare every stage.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face checkpoint directory (the PyTorch side)")
    parser.add_argument("--ms-dir", metavar="DIR", help="MindSpore side: a converted directory (default: HF_DIR)")
    parser.add_argument("--image", metavar="PATH", nargs="+", action="extend",
                        help="image file(s) for the prompt (default: a text-only prompt)")
    parser.add_argument("--query", default="Describe this image.", help="the user's message (default: %(default)r)")
    parser.add_argument("--hd-num", type=positive_int, metavar="N",
                        help="XComposer2: HD tile budget per image (default: the variant's)")
    parser.add_argument("--steps", type=positive_int, default=8, metavar="N",
                        help="greedy steps compared (default: 8)")
    add_runtime_arguments(parser)  # --device, --mode, --dtype (the MindSpore side's compute dtype)
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    side = parser.add_mutually_exclusive_group()
    side.add_argument("--trust-remote-code", action="store_true",
                      help="use HF_DIR's own modeling_*.py (executes that code) as the PyTorch side")
    side.add_argument("--reference", action="store_true",
                      help="use the project's PyTorch reference even if HF_DIR carries remote code")
    parser.set_defaults(func=run)
