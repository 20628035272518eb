"""InternVL-1.5 image preprocessing: the model card's `load_image` with `dynamic_preprocess`, numpy + PIL only.

`load_image(image, input_size=448, max_num=6)` -> float32 pixels [T, 3, 448, 448], as the official code:

1. `dynamic_preprocess`: pick a grid of i columns x j rows (min_num <= i*j <= max_num) whose ratio i/j is
   closest to the image's width/height (ties: see `find_closest_aspect_ratio`), resize the whole image
   (aspect not kept) to (448 i) x (448 j) with PIL's bicubic filter, cut it into i*j tiles row-major, and
   append the ORIGINAL image resized to 448x448 as a thumbnail when there is more than one tile.
2. Per tile: torchvision `Resize((448, 448), BICUBIC)` (a no-op here: every tile already is 448x448, and PIL
   returns a copy for an unchanged size), `ToTensor` and ImageNet `Normalize`, done in numpy with the same
   float32 operations (`ms_xcomposer.processing.normalize`), which gives bit-identical pixels.

Difference from the official loader, on purpose and shared with the XComposer2 path: images are opened with
`ms_xcomposer.processing.load_image`, which composites transparency on white (the official
`Image.open(...).convert("RGB")` keeps whatever colour hides under transparent pixels), scales 16-bit
greyscale to 8 bits and refuses decompression bombs. RGB images are unaffected.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image

from ms_xcomposer.images import MAX_IMAGE_PIXELS, ImageError, ImageInput, normalize
from ms_xcomposer.images import load_image as open_rgb

DEFAULT_MAX_NUM = 6  # the model card's load_image(max_num=6)

IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), dtype=np.float32)
IMAGENET_STD = np.array((0.229, 0.224, 0.225), dtype=np.float32)

Grid = Tuple[int, int]  # (columns, rows)


def target_ratios(min_num: int, max_num: int) -> List[Grid]:
    """Candidate grids (cols, rows) with min_num <= cols*rows <= max_num, in the official order.

    The official code collects the pairs in a Python set and sorts by area only, so equal-area grids keep the
    set's iteration order. That order is deterministic in CPython (small-int tuples hash the same in every
    process) but depends on how the set was filled, so the set is built by the same comprehension.
    """
    if min_num < 1 or max_num < min_num:
        raise ValueError(f"tile counts need 1 <= min_num <= max_num, got min_num={min_num}, max_num={max_num}")
    ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
        if min_num <= i * j <= max_num)
    return sorted(ratios, key=lambda x: x[0] * x[1])


def find_closest_aspect_ratio(aspect_ratio: float, ratios: Sequence[Grid], width: int, height: int,
                              image_size: int) -> Grid:
    """The grid of `ratios` whose cols/rows is closest to `aspect_ratio`, walking the list in order.

    A strictly smaller difference replaces the choice; an exactly equal one (float equality, i.e. the same
    cols/rows) replaces it only when the image has more than half the pixels of that grid
    (width*height > 0.5 * image_size^2 * cols * rows), so big images get the larger of two equal-ratio grids.
    """
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for ratio in ratios:
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best = ratio
    return best


def choose_grid(width: int, height: int, min_num: int = 1, max_num: int = 6, image_size: int = 448) -> Grid:
    """(cols, rows) of the tile grid `dynamic_preprocess` uses for a width x height image."""
    return find_closest_aspect_ratio(width / height, target_ratios(min_num, max_num), width, height, image_size)


def dynamic_preprocess(image: Image.Image, min_num: int = 1, max_num: int = 6, image_size: int = 448,
                       use_thumbnail: bool = False) -> List[Image.Image]:
    """The official tiling of an RGB PIL image: i*j tiles of image_size^2, row-major, plus the thumbnail
    (the original image resized to image_size^2) last when `use_thumbnail` and i*j > 1.

    PIL's bicubic filter is named explicitly: it is `Image.resize`'s default for RGB images, which the
    official code relies on.
    """
    cols, rows = choose_grid(image.width, image.height, min_num, max_num, image_size)
    resized = image.resize((image_size * cols, image_size * rows), Image.Resampling.BICUBIC)
    tiles = []
    for k in range(cols * rows):
        left, top = (k % cols) * image_size, (k // cols) * image_size
        tiles.append(resized.crop((left, top, left + image_size, top + image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


def load_image(image: ImageInput, input_size: int = 448, max_num: int = 6, min_num: int = 1,
               use_thumbnail: bool = True, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Normalised pixels float32 [T, 3, input_size, input_size] of one image, as the model card's `load_image`.

    image: a file path, a PIL image (any mode) or a uint8 array (see `ms_xcomposer.processing.load_image`).
    T = cols*rows of the chosen grid, plus 1 (the thumbnail, last) when that is more than one tile.
    Raises `ImageError` for unreadable, empty or oversized images and ValueError for bad tile counts.
    """
    if input_size < 1:
        raise ValueError(f"input_size must be positive, got {input_size}")
    img = open_rgb(image, max_pixels=max_pixels)
    tiles = dynamic_preprocess(img, min_num=min_num, max_num=max_num, image_size=input_size,
                               use_thumbnail=use_thumbnail)
    return np.concatenate([normalize(t, IMAGENET_MEAN, IMAGENET_STD) for t in tiles], axis=0)


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageError", "target_ratios", "find_closest_aspect_ratio",
           "choose_grid", "dynamic_preprocess", "load_image"]
