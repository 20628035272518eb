#!/usr/bin/env python
"""Chat with an InternVL-1.5 checkpoint (InternVL-Chat-V1-5, Mini-InternVL-Chat-2B-V1-5): convert it once, then
ask about one image, several images, or none, and follow up.

    python examples/internvl_chat.py HF_DIR MS_DIR --image photo.jpg
    python examples/internvl_chat.py HF_DIR MS_DIR --image a.jpg --image b.jpg --query "Compare the two images."
    python examples/internvl_chat.py HF_DIR MS_DIR --query "Write a haiku." --follow-up "Another one."
    python examples/internvl_chat.py HF_DIR MS_DIR --image photo.jpg --official     # the model card's API

HF_DIR is a downloaded model directory (config.json with `InternVLChatModel`, safetensors or .bin shards, the
tokenizer). MS_DIR is written once (skipped when it exists). Decoding is greedy, as on the model card
(`dict(num_beams=1, max_new_tokens=512, do_sample=False)`). Each image is cut into at most --max-num tiles of
448 px plus a thumbnail; one image goes before the question, several get the official `<image k> (图k):` blocks.
--official uses `model.chat(tokenizer, pixel_values, question, generation_config)` as the model card does.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

os.environ.setdefault("GLOG_v", "3")  # quiet MindSpore's C++ log, before mindspore is imported


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", help="Hugging Face InternVL-1.5 checkpoint directory")
    parser.add_argument("ms_dir", help="converted MindSpore directory (created if absent)")
    parser.add_argument("--image", action="append", default=[], help="image file (repeat for several; none: text)")
    parser.add_argument("--query", default="Describe this image.", help="first message")
    parser.add_argument("--follow-up", help="optional second message (the conversation continues)")
    parser.add_argument("--max-num", type=int, default=6, help="most tiles per image (default 6, the model card's)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--official", action="store_true", help="use the official model.chat signature")
    parser.add_argument("--mode", default="pynative", choices=("pynative", "graph"))
    parser.add_argument("--device", default="CPU", help="CPU, GPU or Ascend")
    args = parser.parse_args(argv)

    from ms_xcomposer import chat, load
    from ms_xcomposer.conversion.convert import convert

    if not os.path.exists(args.ms_dir):
        print(f"converted {convert(args.hf_dir, args.ms_dir).summary()}", file=sys.stderr)
    model, processor = load(args.ms_dir, device=args.device, mode=args.mode)

    if args.official:  # the model card: pixel_values of all images' tiles, a generation_config dict
        import numpy as np

        pixel_values = (np.concatenate([processor.load_image(p, max_num=args.max_num) for p in args.image])
                        if args.image else None)
        generation_config = dict(num_beams=1, max_new_tokens=args.max_new_tokens, do_sample=False)
        response, history = model.chat(processor.tokenizer, pixel_values, args.query, generation_config,
                                       history=None, return_history=True)
        print(response)
        if args.follow_up:
            print(model.chat(processor.tokenizer, pixel_values, args.follow_up, generation_config, history=history))
        return 0

    options = dict(max_num=args.max_num, do_sample=False, max_new_tokens=args.max_new_tokens)
    response, history = chat(model, processor, args.query, images=args.image, **options)
    print(response)
    if args.follow_up:
        # The images are sent again with every turn; they stay in the first turn of the prompt.
        response, history = chat(model, processor, args.follow_up, images=args.image, history=history, **options)
        print(response)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
