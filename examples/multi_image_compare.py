#!/usr/bin/env python
"""Ask one question about several images at once (IXC-2.5 multi-image chat).

    python examples/multi_image_compare.py MS_DIR cars1.jpg cars2.jpg cars3.jpg \\
        --question "Analyse the advantages and weaknesses of each car."

Each image gets a label and an `<ImageHere>` mark in the query ("Image1 <ImageHere>; Image2 <ImageHere>; ..."),
as in the official IXC-2.5 examples. With several images IXC-2.5 uses at most 6 HD tiles per image.
IXC2-VL and IXC2-4KHD accept the same prompt (one `<ImageHere>` per image).
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional, Sequence

os.environ.setdefault("GLOG_v", "3")  # quiet MindSpore's C++ log, before mindspore is imported


def build_query(n_images: int, question: str) -> str:
    """'Image1 <ImageHere>; Image2 <ImageHere>; <question>' for n_images images."""
    return "".join(f"Image{i + 1} <ImageHere>; " for i in range(n_images)) + question


def compare(model, processor, images: Sequence[str], question: str, **options) -> str:
    """The model's answer to `question` about `images` (greedy unless options say otherwise)."""
    from ms_xcomposer import chat

    response, _ = chat(model, processor, build_query(len(images), question), images=list(images), **options)
    return response


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="converted MindSpore directory (or an HF directory)")
    parser.add_argument("images", nargs="+", help="two or more image files")
    parser.add_argument("--question", default="What are the differences between these images?")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--num-beams", type=int, default=1, help="the official 2.5 example uses 3")
    parser.add_argument("--repetition-penalty", type=float, default=1.005)
    parser.add_argument("--use-meta", action="store_true", help="send the system prompt (IXC-2.5)")
    parser.add_argument("--mode", default="pynative", choices=("pynative", "graph"))
    parser.add_argument("--device", default="CPU", help="CPU, GPU or Ascend")
    args = parser.parse_args(argv)
    if len(args.images) < 2:
        parser.error("give at least two images to compare")

    from ms_xcomposer import load

    model, processor = load(args.model_dir, device=args.device, mode=args.mode)
    print(compare(model, processor, args.images, args.question, do_sample=False, max_new_tokens=args.max_new_tokens,
                  num_beams=args.num_beams, repetition_penalty=args.repetition_penalty, use_meta=args.use_meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
