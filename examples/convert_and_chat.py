#!/usr/bin/env python
"""Convert a Hugging Face XComposer2 checkpoint to MindSpore, then chat about an image (two turns).

    python examples/convert_and_chat.py HF_DIR MS_DIR --image photo.jpg
    python examples/convert_and_chat.py HF_DIR MS_DIR --image photo.jpg --query "What is in the picture?" \\
        --follow-up "What colour is it?" --mode graph

HF_DIR is a downloaded model directory (internlm-xcomposer2d5-7b, internlm-xcomposer2-vl-7b, ...; .bin or
safetensors shards). MS_DIR is written once (skipped when it already holds a conversion; --overwrite redoes it).
Decoding is greedy (repetition penalty 1.005 as the official chat, --repetition-penalty 1.0 to turn it off).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

os.environ.setdefault("GLOG_v", "3")  # quiet MindSpore's C++ log, before mindspore is imported


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", help="Hugging Face checkpoint directory")
    parser.add_argument("ms_dir", help="converted MindSpore directory (created if absent)")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--query", default="Describe this image.", help="first message")
    parser.add_argument("--follow-up", help="optional second message (the conversation continues)")
    parser.add_argument("--hd-num", type=int, help="HD tile budget (default: the variant's)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repetition-penalty", type=float, default=1.005)
    parser.add_argument("--mode", default="pynative", choices=("pynative", "graph"))
    parser.add_argument("--device", default="CPU", help="CPU, GPU or Ascend")
    parser.add_argument("--overwrite", action="store_true", help="convert again even if MS_DIR exists")
    args = parser.parse_args(argv)

    from ms_xcomposer import chat, load
    from ms_xcomposer.conversion.convert import convert

    if args.overwrite or not os.path.exists(args.ms_dir):
        result = convert(args.hf_dir, args.ms_dir, overwrite=args.overwrite)
        print(f"converted {result.summary()}", file=sys.stderr)

    model, processor = load(args.ms_dir, device=args.device, mode=args.mode)
    options = dict(hd_num=args.hd_num, do_sample=False, max_new_tokens=args.max_new_tokens,
                   repetition_penalty=args.repetition_penalty)

    response, history = chat(model, processor, args.query, images=[args.image], **options)
    print(response)
    if args.follow_up:
        # Images are sent again with every turn: the model sees the whole conversation each time.
        response, history = chat(model, processor, args.follow_up, images=[args.image], history=history, **options)
        print(response)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
