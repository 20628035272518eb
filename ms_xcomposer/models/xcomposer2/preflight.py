"""What `ms-xcomposer chat` checks of an XComposer2 request before it loads the model (the family's half of
`commands/chat_preflight.py`): every image (a file, not a directory; decodable; not over max_pixels; videos only
for IXC-2.5), the `<ImageHere>` count (the prompt rules), `infer_mode` against the checkpoint's task adapters,
and the memory the request needs (`ms_xcomposer.memory`). Images are decoded and preprocessed here, so the chat
itself does no file work.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ms_xcomposer.images import MAX_IMAGE_PIXELS, ImageError, load_image
from ms_xcomposer.models.xcomposer2.config import INFER_MODES, XComposerConfig
from ms_xcomposer.models.xcomposer2.processing import VIDEO_EXTENSIONS, hd_grid, preprocess, tile_grid
from ms_xcomposer.models.xcomposer2.prompt import DEFAULT_MAX_LENGTH, TextPiece, build_chat_prompt, effective_hd_num
from ms_xcomposer.tokenizer import InternLM2Tokenizer


class XComposer2RequestCheck:
    """Checks of one chat session's requests: `check_path` per image, `pixels` per turn, `estimate` once."""

    def __init__(self, model_dir: str, config: XComposerConfig, options: dict):
        """options: the chat options the command line gives (hd_num, use_meta, meta_instruction, infer_mode,
        max_pixels)."""
        self.config, self.tokenizer = config, InternLM2Tokenizer.from_pretrained(model_dir)
        self.max_pixels = options.get("max_pixels", MAX_IMAGE_PIXELS)
        self.hd_num = options.get("hd_num")
        self.use_meta = options.get("use_meta", False)
        self.meta_instruction = options.get("meta_instruction")
        infer_mode = options.get("infer_mode", "base")
        missing = [t for t in INFER_MODES[infer_mode] if t not in config.task_adapters]
        if missing:
            raise ValueError(f"--infer-mode {infer_mode} needs the task adapters lora_{'/'.join(missing)}, which "
                             "this checkpoint does not have (converted with --task-lora drop, or not IXC-2.5)")

    def check_path(self, path: str):
        """A decoded RGB PIL image of `path` (or the path itself for a video), or a one-line error naming it."""
        if os.path.isdir(path):
            raise IsADirectoryError(f"image {path} is a directory, not an image file")
        if not os.path.exists(path):
            raise FileNotFoundError(f"image {path} does not exist")
        if path.lower().endswith(VIDEO_EXTENSIONS):
            if not self.config.spec.accepts_video:
                raise ImageError(f"{path}: {self.config.variant} does not take videos (only IXC-2.5 does)")
            return path
        return load_image(path, max_pixels=self.max_pixels)

    def pixels(self, images: Sequence) -> List[np.ndarray]:
        """Normalised pixels of each image of one turn (as `check_path` gives them), at the turn's tile budget
        (IXC-2.5 uses 6 with several images)."""
        hd = effective_hd_num(self.config.spec, len(images), self.hd_num)
        return [preprocess(image, self.config.spec, hd, max_pixels=self.max_pixels) for image in images]

    def estimate(self, query: Optional[str], images: Sequence, max_new_tokens: int, compute: str,
                 weight_dtype: str, weight_bytes: int, num_beams: int):
        """(memory estimate, pixels of `images` for a --query turn or None): the prompt's rows from the prompt
        rules and the images' HD grids (from their sizes; videos are decoded for theirs)."""
        from ms_xcomposer import memory
        from ms_xcomposer.models.xcomposer2.memory import grid_load

        cfg = self.config
        hd = effective_hd_num(cfg.spec, len(images), self.hd_num)
        grids = [self._grid(image, hd) for image in images]
        vision = grid_load(cfg, [g for g, _ in grids], memory.dtype_bytes(compute))
        if query is None:  # interactive: the first turn's images and some text
            rows = vision.rows + memory.TEXT_ALLOWANCE
        else:
            pieces = build_chat_prompt(query, (), cfg.spec, len(images) if images else None, self.use_meta,
                                       self.meta_instruction)
            text = sum(len(self.tokenizer.encode(p.text, add_bos=p.add_bos)) for p in pieces
                       if isinstance(p, TextPiece))
            rows = text + vision.rows
            if images:
                rows = min(rows, DEFAULT_MAX_LENGTH[cfg.variant])  # the official cut
        est = memory.estimate(cfg, prompt_rows=rows, max_new_tokens=max_new_tokens, compute_dtype=compute,
                              weight_dtype=weight_dtype, weight_bytes=weight_bytes,
                              vision_activation=vision.activation, num_beams=num_beams)
        pixels = None
        if query is not None and images:  # videos were decoded for their grid already
            pixels = [p if p is not None else preprocess(image, cfg.spec, hd, max_pixels=self.max_pixels)
                      for image, (_, p) in zip(images, grids)]
        return est, pixels

    def _grid(self, image, hd: int) -> Tuple[Optional[Tuple[int, int]], Optional[np.ndarray]]:
        """(grid, pixels or None): the HD grid from the size alone for images; videos must be decoded for it."""
        cfg = self.config
        if isinstance(image, str):  # a video: its canvas size is known only after decoding the frames
            pixels = preprocess(image, cfg.spec, max_pixels=self.max_pixels)
            return tile_grid(pixels, cfg.tile_size), pixels
        if not cfg.spec.hd_tiles:
            return None, None
        return hd_grid(image.size, hd, cfg.tile_size, cfg.spec.image_transform), None
