#!/usr/bin/env python
"""Convert an llava-hf LLaVA-1.5 checkpoint to MindSpore, then ask about an image two ways: the project's `chat`,
and transformers' style (`processor(images=..., text=...)`, `model.generate`), which give the same answer.

    python examples/llava_chat.py HF_DIR MS_DIR --image photo.jpg
    python examples/llava_chat.py HF_DIR MS_DIR --image photo.jpg --query "What is in the picture?" --mode graph

HF_DIR is an llava-hf directory (llava-1.5-7b-hf, llava-1.5-13b-hf; either key layout). MS_DIR is written once
(skipped when it already exists; --overwrite redoes it). Decoding is greedy.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

os.environ.setdefault("GLOG_v", "3")  # quiet MindSpore's C++ log, before mindspore is imported


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", help="llava-hf checkpoint directory")
    parser.add_argument("ms_dir", help="converted MindSpore directory (created if absent)")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--query", default="What is in the picture?", help="the question")
    parser.add_argument("--max-new-tokens", type=int, default=64)
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

    # 1. the project's chat: the llava-hf template is built for you
    response, _ = chat(model, processor, args.query, images=[args.image], do_sample=False,
                       max_new_tokens=args.max_new_tokens)
    print(response)

    # 2. transformers' way: the prompt written out, ids in, ids out
    inputs = processor(images=args.image, text=f"USER: <image>\n{args.query} ASSISTANT:")
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
