"""Image and video preprocessing of the XComposer2 family, equal to the official torchvision pipelines.

`preprocess(image, variant, hd_num)` returns the normalised float32 pixels [1, 3, H, W] the vision tower eats:

- VL (`image_transform == "resize"`): bicubic resize to 490x490.
- 4KHD (`"hd_centre"`): portrait images are transposed; the largest `scale` with scale*ceil(scale/ratio) <=
  hd_num is picked; bilinear resize to width scale*336; white padding, centred, to a multiple of 336 in
  height; transposed back.
- IXC-2.5 (`"hd_bottom"`): the same search, then scale = min(ceil(width/560), scale) (never wider than the
  original by more than one tile), width scale*560, white padding at the bottom.

The official code runs torchvision transforms on PIL images; torchvision is not installable here, so this
module does what those transforms do: `Resize` on a PIL image is `PIL.Image.resize` with PIL's filter (PIL
always antialiases, so torchvision's `antialias` flag does not apply), `pad` is `ImageOps.expand` (a white
canvas), `ToTensor` is uint8 / 255 in float32 and `Normalize` subtracts the float32 mean and divides by the
float32 std, one rounding per operation. Doing the same float32 operations in the same order in numpy
gives bit-identical pixels (max abs difference 0.0 against the golden `pixels_*` arrays). Transposes are done
literally, because PIL resizes in two passes rounded to uint8 in between, so resizing a transposed image is
not the transpose of the resized image.

The 4KHD and 2.5 vision towers also see a global view: the normalised image bicubic-interpolated to one tile
(PyTorch `F.interpolate(mode="bicubic", align_corners=False)`), see `global_view`. Measured on the golden
2.5 pixels `pixels_wide_hd4` (1120x1120 -> 560x560): max abs difference to PyTorch 7.2e-7 (float32
summation order); MindSpore 2.10 `ops.interpolate(mode="bicubic", align_corners=False)` on CPU differs from
PyTorch by up to 0.229 (mean 0.0035) on the same input, which is why `ms_xcomposer.bicubic` uses fixed
interpolation matrices instead.

Differences from the official loaders, on purpose: images with transparency are composited on white (the
official `.convert("RGB")` keeps whatever colour hides under transparent pixels) and 16-bit greyscale images
are scaled to 8 bits (PIL's conversion clips them to 255). Images over `MAX_IMAGE_PIXELS` are refused.

Video (IXC-2.5 only): `load_video_frames` samples frames at 1 fps (at most 32), `frames_to_canvas` tiles them
on one white canvas with `<IMAGE i>` labels and separator lines, `video_transform` scales the canvas' short
side to 560 and pads the long side with white to a multiple of 560 (`preprocess_video` chains all three).
The official code draws the labels with the SimHei font downloaded at start-up; the default here is PIL's
built-in font (no network), so label pixels differ unless `font_path` points at SimHei.ttf.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageSequence

from ms_xcomposer.bicubic import resize_bicubic_np
from ms_xcomposer.config import VariantSpec, variant_spec

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), dtype=np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), dtype=np.float32)

# Largest accepted source image, in pixels (PIL's own decompression-bomb threshold). PIL itself refuses
# images over twice its `Image.MAX_IMAGE_PIXELS` whatever limit is passed here.
MAX_IMAGE_PIXELS = 89_478_485

# File extensions the official IXC-2.5 code treats as videos (a .gif path is an image there: its first frame).
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".wmv")

_WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

ImageInput = Union[str, "os.PathLike[str]", Image.Image, np.ndarray]


class ImageError(ValueError):
    """An image or video cannot be read or is not acceptable (corrupt, empty, too large, wrong shape)."""


def tile_size(variant: Union[str, VariantSpec]) -> int:
    """Side of one ViT input for the variant: 490 (VL), 336 (4KHD), 560 (2.5)."""
    return variant_spec(variant).tile_size


# ---- the public entry point -----------------------------------------------------------------------------
def preprocess(image: ImageInput, variant: Union[str, VariantSpec], hd_num: Optional[int] = None,
               *, max_pixels: int = MAX_IMAGE_PIXELS, font_path: Optional[str] = None) -> np.ndarray:
    """Normalised pixels float32 [1, 3, H, W] of one image, as the official `encode_img` computes them.

    image: a file path (a video file for IXC-2.5, see `VIDEO_EXTENSIONS`), a PIL image (any mode), a uint8
    array HxW / HxWx1 / HxWx3 / HxWx4, or already normalised float pixels [1,3,H,W] / [3,H,W], which are
    returned as float32 [1,3,H,W] after a shape check. hd_num: the HD tile budget (default: the variant's;
    ignored by VL and videos). max_pixels: largest accepted source image. font_path: label font of video
    canvases (see `frames_to_canvas`). H and W are multiples of `tile_size(variant)`; VL gives 490x490.
    """
    spec = variant_spec(variant)
    tile = tile_size(spec)
    if hd_num is None:
        hd_num = spec.default_hd_num
    if isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating):
        return _check_pixels(image, spec, tile)
    if isinstance(image, (str, os.PathLike)) and os.fspath(image).lower().endswith(VIDEO_EXTENSIONS):
        return preprocess_video(image, spec, max_pixels=max_pixels, font_path=font_path)
    img = load_image(image, max_pixels=max_pixels)
    if spec.image_transform == "resize":
        img = img.resize((tile, tile), Image.Resampling.BICUBIC)
    else:
        img = hd_transform(img, hd_num, tile, spec.image_transform)
    return normalize(img)


# ---- loading --------------------------------------------------------------------------------------------
def load_image(image: ImageInput, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB PIL image from a path, a PIL image or a uint8 array; errors name the file.

    Transparency is composited on white, 16-bit greyscale is scaled to 8 bits, other modes go through PIL's
    conversion. Zero-size images and images over `max_pixels` pixels raise `ImageError`.
    """
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        img = _open(path, max_pixels)
        name = path
    elif isinstance(image, Image.Image):
        img = image
        name = getattr(image, "filename", "") or "<PIL image>"
    elif isinstance(image, np.ndarray):
        img = _from_array(image)
        name = "<array>"
    else:
        raise ImageError(f"expected an image path, a PIL image or a numpy array, got {type(image).__name__}")
    _check_size(img.size, name, max_pixels)
    try:
        return to_rgb(img)
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # e.g. a lazily opened, truncated file
        raise ImageError(f"{name!r} cannot be converted to RGB: {e}") from None


def _open(path: str, max_pixels: int) -> Image.Image:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file {path!r} not found")
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit; the explicit check below decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        _check_size(img.size, path, max_pixels)  # from the header, before decoding
        img.load()
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path!r}: image too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{path!r} is not a readable image: {e}") from None
    return img


def _check_size(size: Tuple[int, int], name: str, max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name!r} is an empty image ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(f"{name!r} has {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                         "(possible decompression bomb; pass a larger max_pixels to allow it)")


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
        out = Image.new("RGB", rgba.size, _WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


# ---- transforms -----------------------------------------------------------------------------------------
def hd_transform(img: Image.Image, hd_num: int, tile: int, kind: str = "hd_bottom") -> Image.Image:
    """The 4KHD (`kind="hd_centre"`) or IXC-2.5 (`"hd_bottom"`) HD resize and white padding of an RGB image.

    Returns an RGB image whose sides are multiples of `tile`, with at most `hd_num` tiles.
    """
    if kind not in ("hd_centre", "hd_bottom"):
        raise ImageError(f"unknown HD transform {kind!r}; expected 'hd_centre' or 'hd_bottom'")
    if isinstance(hd_num, bool) or not isinstance(hd_num, (int, np.integer)) or hd_num < 1:
        raise ImageError(f"hd_num must be a positive integer, got {hd_num!r}")
    width, height = img.size
    transposed = width < height
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
        width, height = img.size
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    if kind == "hd_bottom":
        scale = min(math.ceil(width / tile), scale)
    new_w = int(scale * tile)
    new_h = int(new_w / ratio)
    if new_h < 1:
        raise ImageError(f"image of {img.size} is too elongated: it would be resized to {new_w}x{new_h}")
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    target = math.ceil(new_h / tile) * tile
    top = (target - new_h) // 2 if kind == "hd_centre" else 0
    canvas = Image.new("RGB", (new_w, target), _WHITE)
    canvas.paste(img, (0, top))
    if transposed:
        canvas = canvas.transpose(Image.Transpose.TRANSPOSE)
    return canvas


def normalize(img: Image.Image, mean: np.ndarray = CLIP_MEAN, std: np.ndarray = CLIP_STD) -> np.ndarray:
    """ToTensor + Normalize (CLIP mean/std unless given, float32) of an RGB image: float32 [1, 3, H, W], same
    float32 rounding as torchvision."""
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def _check_pixels(pixels: np.ndarray, spec: VariantSpec, tile: int) -> np.ndarray:
    if pixels.ndim == 3:
        pixels = pixels[None]
    if pixels.ndim != 4 or pixels.shape[:2] != (1, 3):
        raise ImageError(f"normalised pixels must be [1,3,H,W] or [3,H,W], got shape {pixels.shape}")
    h, w = pixels.shape[2:]
    if spec.image_transform == "resize" and (h, w) != (tile, tile):
        raise ImageError(f"{spec.name} expects {tile}x{tile} pixels, got {h}x{w}")
    if h == 0 or w == 0 or h % tile or w % tile:
        raise ImageError(f"{spec.name} expects H and W as positive multiples of {tile}, got {h}x{w}")
    return np.ascontiguousarray(pixels, dtype=np.float32)


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


# ---- video (IXC-2.5) ------------------------------------------------------------------------------------
MAX_VIDEO_FRAMES = 32
_LABEL_HEIGHT = 40  # room above (or beside) each frame for its label
_GAP = 10  # between frames; the separator line runs through its middle


def load_video_frames(source: Union[str, "os.PathLike[str]", Sequence[Union[Image.Image, np.ndarray]]],
                      max_frames: int = MAX_VIDEO_FRAMES, max_pixels: int = MAX_IMAGE_PIXELS) -> List[Image.Image]:
    """RGB frames sampled as the official `load_video`: one per second, then at most `max_frames`.

    source: a video file (needs PyAV, `pip install av`), an animated image file such as a GIF (frame rate
    from the frame durations), or a list of frames (PIL images or uint8 arrays, taken as already sampled:
    only the `max_frames` cut applies). When more frames than `max_frames` remain, frames at
    int(i * n / (max_frames + 1)) for i < max_frames are kept, as the official code does.
    """
    if max_frames < 1:
        raise ImageError(f"max_frames must be at least 1, got {max_frames}")
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"video file {path!r} not found")
        if path.lower().endswith(VIDEO_EXTENSIONS):
            return _read_video_av(path, max_frames, max_pixels)
        return _read_animated_image(path, max_frames, max_pixels)
    frames = [load_image(f, max_pixels=max_pixels) for f in source]
    if not frames:
        raise ImageError("no video frames given")
    return [frames[i] for i in _sample_positions(len(frames), 1.0, max_frames)]


def _sample_positions(n_frames: int, fps: float, max_frames: int) -> List[int]:
    """Frame indices: every round(fps)-th frame (1 per second), then the official even cut to max_frames."""
    stride = max(1, int(round(fps)))
    positions = list(range(0, n_frames, stride))
    if len(positions) > max_frames:
        step = len(positions) / (max_frames + 1)
        positions = [positions[int(i * step)] for i in range(max_frames)]
    return positions


def _read_animated_image(path: str, max_frames: int, max_pixels: int) -> List[Image.Image]:
    img = _open(path, max_pixels)
    durations = []
    frames = []
    try:
        for frame in ImageSequence.Iterator(img):
            # Browsers show frames with no (or a zero) delay for 100 ms.
            durations.append(frame.info.get("duration") or 100)
            frames.append(to_rgb(frame.copy()))
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{path!r}: cannot read frame {len(frames)}: {e}") from None
    fps = len(frames) / (sum(durations) / 1000.0)
    return [frames[i] for i in _sample_positions(len(frames), fps, max_frames)]


def _read_video_av(path: str, max_frames: int, max_pixels: int) -> List[Image.Image]:
    try:
        import av  # optional dependency: only video files need it
    except ImportError:
        raise ImageError(f"reading the video {path!r} needs PyAV: pip install av "
                         "(or pass the frames as a list of images)") from None
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ImageError(f"{path!r} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            if not rate:
                raise ImageError(f"{path!r}: the video stream has no frame rate")
            n_frames = stream.frames or sum(1 for p in container.demux(stream) if p.size)
        wanted = set(_sample_positions(n_frames, float(rate), max_frames))
        frames: List[Image.Image] = []
        with av.open(path) as container:
            for idx, frame in enumerate(container.decode(video=0)):
                if idx in wanted:
                    _check_size((frame.width, frame.height), path, max_pixels)
                    frames.append(Image.fromarray(frame.to_ndarray(format="rgb24")))
                if len(frames) == len(wanted):
                    break
    except av.error.FFmpegError as e:
        raise ImageError(f"{path!r} is not a readable video: {e}") from None
    if not frames:
        raise ImageError(f"{path!r}: no frame could be decoded")
    return frames


def frames_to_canvas(frames: Sequence[Union[Image.Image, np.ndarray]], font_path: Optional[str] = None,
                     font_size: int = 40, tile: int = 560) -> Image.Image:
    """One white RGB canvas with the frames (long side resized to 2*tile) and `<IMAGE i>` labels.

    As the official `frame2img`: landscape frames are stacked top to bottom, each under a 40-pixel label
    band, with a 2-pixel black line in the 10-pixel gap between frames; portrait frames go left to right,
    labels above, vertical lines between. The orientation is that of the last frame (as in the official
    code). Labels use `font_path` (a TrueType file, e.g. the official SimHei.ttf) or PIL's built-in font.
    """
    if not frames:
        raise ImageError("no video frames given")
    long_side = 2 * tile
    resized = []
    for frame in frames:
        img = load_image(frame)
        w, h = img.size
        scale = w / h
        new_w, new_h = (long_side, int(long_side / scale)) if w > h else (int(long_side * scale), long_side)
        if new_w < 1 or new_h < 1:
            raise ImageError(f"video frame of {w}x{h} is too elongated to resize to {long_side} pixels")
        resized.append(img.resize((new_w, new_h), Image.Resampling.BILINEAR))
    landscape = w > h  # orientation of the last source frame decides the layout
    font = _label_font(font_path, font_size)
    step = _LABEL_HEIGHT + _GAP
    if landscape:
        canvas_w = max(im.width for im in resized)
        canvas_h = sum(im.height + step for im in resized)
    else:
        canvas_w = sum(im.width + _GAP for im in resized)
        canvas_h = max(im.height for im in resized) + _LABEL_HEIGHT
    canvas = Image.new("RGB", (canvas_w, canvas_h), _WHITE)
    draw = ImageDraw.Draw(canvas)
    offset = 0
    for idx, im in enumerate(resized):
        last = idx + 1 == len(resized)
        if landscape:
            canvas.paste(im, (0, offset + _LABEL_HEIGHT))
            draw.text((0, offset), f"<IMAGE {idx}>", font=font, fill="black")
            if not last:
                y = offset + _LABEL_HEIGHT + im.height + _GAP // 2
                draw.line([(0, y), (canvas_w, y)], fill="black", width=2)
            offset += im.height + step
        else:
            canvas.paste(im, (offset, _LABEL_HEIGHT))
            draw.text((offset, 0), f"<IMAGE {idx}>", font=font, fill="black")
            if not last:
                x = offset + im.width + _GAP // 2
                draw.line([(x, 0), (x, canvas_h)], fill="black", width=2)
            offset += im.width + _GAP
    return canvas


def _label_font(font_path: Optional[str], size: int) -> Union[ImageFont.ImageFont, ImageFont.FreeTypeFont]:
    if not font_path:
        return ImageFont.load_default(size=size)  # embedded in PIL: no file, no network
    try:
        return ImageFont.truetype(font_path, size)
    except OSError as e:
        raise ImageError(f"cannot load the label font {font_path!r}: {e}") from None


def video_transform(canvas: Image.Image, tile: int = 560) -> Image.Image:
    """The official `Video_transform`: short side to `tile` (bilinear), long side padded with white at its end
    (right or bottom) to a multiple of `tile`. No hd_num cap applies to videos."""
    width, height = canvas.size
    transposed = width < height
    img = canvas.transpose(Image.Transpose.TRANSPOSE) if transposed else canvas
    ratio = img.width / img.height
    new_w = int(tile * ratio)
    img = img.resize((new_w, tile), Image.Resampling.BILINEAR)
    img = img.transpose(Image.Transpose.TRANSPOSE)  # long side vertical: pad at the bottom
    padded = Image.new("RGB", (img.width, math.ceil(img.height / tile) * tile), _WHITE)
    padded.paste(img, (0, 0))
    return padded if transposed else padded.transpose(Image.Transpose.TRANSPOSE)


def preprocess_video(source: Union[str, "os.PathLike[str]", Sequence[Union[Image.Image, np.ndarray]]],
                     variant: Union[str, VariantSpec] = "ixc2.5", *, max_frames: int = MAX_VIDEO_FRAMES,
                     max_pixels: int = MAX_IMAGE_PIXELS, font_path: Optional[str] = None) -> np.ndarray:
    """Normalised pixels float32 [1, 3, H, W] of a video (file, GIF or frame list): frames -> canvas -> tiles."""
    spec = variant_spec(variant)
    if not spec.accepts_video:
        raise ImageError(f"variant {spec.name} does not take videos (only IXC-2.5 does)")
    frames = load_video_frames(source, max_frames=max_frames, max_pixels=max_pixels)
    canvas = frames_to_canvas(frames, font_path=font_path, tile=spec.tile_size)
    return normalize(video_transform(canvas, spec.tile_size))
