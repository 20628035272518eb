#!/usr/bin/env python
"""Caption every image of a folder, with a progress bar; one JSON line per image.

    python examples/batch_caption.py MS_DIR ./photos --out captions.jsonl
    python examples/batch_caption.py MS_DIR ./photos --hd-num 1 --mode graph --max-new-tokens 64

Images (.jpg .jpeg .png .bmp .gif .webp) are taken in name order. Each output line is
{"image": file name, "caption": text} or {"image": file name, "error": why} for a file that cannot be read;
the exit status is 1 when some image failed. In GRAPH mode the vision tower compiles once per HD tile grid, so a
small --hd-num (1: always one tile) keeps the number of compilations down; the language model compiles once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterator, List, Optional

os.environ.setdefault("GLOG_v", "3")  # quiet MindSpore's C++ log, before mindspore is imported

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def list_images(folder: str) -> List[str]:
    """Image files directly in `folder`, sorted by name."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder} does not exist")
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))


def caption_all(model, processor, images: List[str], query: str, hd_num: Optional[int],
                max_new_tokens: int, progress: bool = True) -> Iterator[dict]:
    """One record per image, in order: {"image", "caption"} or {"image", "error"} (greedy decoding)."""
    from tqdm import tqdm

    from ms_xcomposer import chat

    for path in tqdm(images, desc="captioning", unit="image", file=sys.stderr, disable=not progress):
        name = os.path.basename(path)
        try:
            caption, _ = chat(model, processor, query, images=[path], hd_num=hd_num, do_sample=False,
                              max_new_tokens=max_new_tokens, repetition_penalty=1.0)
        except ValueError as e:  # unreadable or unacceptable image: record it and go on
            yield {"image": name, "error": str(e)}
            continue
        yield {"image": name, "caption": caption}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="converted MindSpore directory (or an HF directory)")
    parser.add_argument("folder", help="folder of images")
    parser.add_argument("--out", help="write the JSON lines here (default: stdout)")
    parser.add_argument("--query", default="Describe this image in one sentence.")
    parser.add_argument("--hd-num", type=int, help="HD tile budget per image (default: the variant's)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--mode", default="pynative", choices=("pynative", "graph"))
    parser.add_argument("--device", default="CPU", help="CPU, GPU or Ascend")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from ms_xcomposer import load

    images = list_images(args.folder)
    if not images:
        print(f"error: no images ({', '.join(IMAGE_EXTENSIONS)}) in {args.folder}", file=sys.stderr)
        return 2
    model, processor = load(args.model_dir, device=args.device, mode=args.mode)
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    failed = 0
    try:
        for record in caption_all(model, processor, images, args.query, args.hd_num, args.max_new_tokens,
                                  progress=not args.no_progress):
            failed += "error" in record
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"captioned {len(images) - failed} of {len(images)} images", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
