"""Image loading and the tensor helpers every family's processor shares (no family-specific transforms here).

- `load_image`: a path, PIL image or uint8 array -> RGB PIL image, with errors that name the file, refusing
  empty images and images over `max_pixels` (decompression bombs) before decoding them;
- `normalize`: ToTensor + Normalize with a family's mean / std, in torchvision's float32 rounding order;
- `tile_grid`, `split_tiles`, `global_view`: HD tiling of normalised pixels.

Differences from the official loaders, on purpose: images with transparency are composited on white (the
official `.convert("RGB")` keeps whatever colour hides under transparent pixels) and 16-bit greyscale images
are scaled to 8 bits (PIL's conversion clips them to 255).
"""
from __future__ import annotations

import os
import warnings
from typing import Tuple, Union

import numpy as np
from PIL import Image

from ms_xcomposer.bicubic import resize_bicubic_np

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), dtype=np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), dtype=np.float32)

# Largest accepted source image, in pixels (PIL's own decompression-bomb threshold). PIL itself refuses
# images over twice its `Image.MAX_IMAGE_PIXELS` whatever limit is passed here.
MAX_IMAGE_PIXELS = 89_478_485

WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

ImageInput = Union[str, "os.PathLike[str]", Image.Image, np.ndarray]


class ImageError(ValueError):
    """An image or video cannot be read or is not acceptable (corrupt, empty, too large, wrong shape)."""


# ---- loading --------------------------------------------------------------------------------------------
def load_image(image: ImageInput, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB PIL image from a path, a PIL image or a uint8 array; errors name the file.

    Transparency is composited on white, 16-bit greyscale is scaled to 8 bits, other modes go through PIL's
    conversion. Zero-size images and images over `max_pixels` pixels raise `ImageError`.
    """
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        img = open_image(path, max_pixels)
        name = path
    elif isinstance(image, Image.Image):
        img = image
        name = getattr(image, "filename", "") or "<PIL image>"
    elif isinstance(image, np.ndarray):
        img = _from_array(image)
        name = "<array>"
    else:
        raise ImageError(f"expected an image path, a PIL image or a numpy array, got {type(image).__name__}")
    check_size(img.size, name, max_pixels)
    try:
        return to_rgb(img)
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # e.g. a lazily opened, truncated file
        raise ImageError(f"{name!r} cannot be converted to RGB: {e}") from None


def open_image(path: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The image file at `path` opened and decoded, its size checked from the header before decoding."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file {path!r} not found")
    return _decode(path, path, max_pixels)


def image_from_bytes(data: bytes, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB image from encoded bytes (PNG, JPEG, ...), with `open_image`'s checks; errors name `name`."""
    import io

    img = _decode(io.BytesIO(data), name, max_pixels)
    try:
        return to_rgb(img)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{name!r} cannot be converted to RGB: {e}") from None


def _decode(source, name: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit; the explicit check below decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source)
        check_size(img.size, name, max_pixels)  # from the header, before decoding
        img.load()
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name!r}: image too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{name!r} is not a readable image: {e}") from None
    return img


def check_size(size: Tuple[int, int], name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """ImageError naming `name` when `size` (w, h) is empty or over `max_pixels` pixels."""
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name!r} is an empty image ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(f"{name!r} has {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                         "(possible decompression bomb; pass a larger max_pixels, `--max-pixels` in the CLI, to allow "
                         "it)")


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.dtype != np.uint8:
        raise ImageError(f"image arrays must be uint8 HxWx3 (or float normalised pixels), got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ImageError(f"image array of shape {arr.shape}: expected HxW, HxWx1, HxWx3 or HxWx4")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"image array of shape {arr.shape} is empty")
    return Image.fromarray(np.ascontiguousarray(arr))


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB version of any PIL image: white behind transparency, 16-bit greyscale scaled to 8 bits."""
    if img.mode in _SIXTEEN_BIT_MODES:
        # x / 257 rounded maps 0..65535 onto 0..255; PIL's own conversion would clip everything over 255.
        grey = (np.asarray(img).astype(np.uint32) + 128) // 257
        img = Image.fromarray(grey.astype(np.uint8), "L")
    if img.mode == "RGB":
        return img
    if "transparency" in img.info or img.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def normalize(img: Image.Image, mean: np.ndarray = CLIP_MEAN, std: np.ndarray = CLIP_STD) -> np.ndarray:
    """ToTensor + Normalize of an RGB image: float32 [1, 3, H, W], same float32 rounding as torchvision."""
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


# ---- tiles and global view (used by the HD vision towers) ----------------------------------------------
def tile_grid(pixels: np.ndarray, tile: int) -> Tuple[int, int]:
    """(rows, cols) = (H // tile, W // tile) of normalised pixels [1, 3, H, W]; H, W must be multiples of tile."""
    h, w = pixels.shape[-2:]
    if h % tile or w % tile or h == 0 or w == 0:
        raise ImageError(f"pixels of {h}x{w} do not split into {tile}x{tile} tiles")
    return h // tile, w // tile


def split_tiles(pixels: np.ndarray, tile: int) -> np.ndarray:
    """Sub-images [rows*cols, 3, tile, tile] of pixels [1, 3, H, W], row-major, as the official vision tower."""
    rows, cols = tile_grid(pixels, tile)
    x = pixels.reshape(3, rows, tile, cols, tile).transpose(1, 3, 0, 2, 4)
    return np.ascontiguousarray(x.reshape(rows * cols, 3, tile, tile))


def global_view(pixels: np.ndarray, tile: int) -> np.ndarray:
    """The whole image as one tile: float32 [1, 3, tile, tile], bicubic with align_corners=False (PyTorch's)."""
    return resize_bicubic_np(pixels, tile, tile)


