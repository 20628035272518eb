"""LLaVA-1.5 image preprocessing, equal to transformers' `CLIPImageProcessor` (the image half of `LlavaProcessor`).

For each image, as `CLIPImageProcessor.preprocess` does it on a PIL image:
1. RGB conversion: transformers' `convert_to_rgb` is PIL's `convert("RGB")`, which drops the alpha channel
   (the colour under transparent pixels is kept) and clips 16-bit greyscale. This differs from the XComposer
   loader (`ms_xcomposer.processing.load_image` composites transparency on white) on purpose: the point of this
   family is transformers' pixels. Uint8 arrays go through `load_image` (HxWx4 arrays are composited there;
   CLIPImageProcessor cannot take them at all).
2. Resize so the shortest edge is `shortest_edge` (336): the long edge becomes int(336 * long / short)
   (`get_resize_output_image_size(default_to_square=False)`), with `PIL.Image.resize(resample=3)` (bicubic, PIL's
   antialiasing filter): transformers' `image_transforms.resize` converts a uint8 array to PIL and back, so the
   result is PIL's uint8 image.
3. Centre crop to crop_size: top = (h - crop_h) // 2, left = (w - crop_w) // 2 (`image_transforms.center_crop`).
4. Rescale by 1/255 and normalise with the config's mean / std (llava-hf: CLIP's) in float32. transformers computes
   float32(float64(x) * (1/255)), which equals float32(x) / float32(255) for every uint8 x, so the project's
   `normalize` gives the same bits.

Result: float32 [N, 3, crop_h, crop_w]. Measured against CLIPImageProcessor: bit-identical (max abs 0.0).

One deliberate difference: transformers guesses the channel axis of the array it makes from the PIL image, and
an image 1 or 3 pixels tall is taken as channels-first (1x1 images then fail, 3-pixel-tall ones give wrong
pixels). Here the PIL image is always height x width x RGB, which equals transformers called with
`input_data_format="channels_last"`.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from ms_xcomposer.config import ConfigError
from ms_xcomposer.images import (CLIP_MEAN, CLIP_STD, MAX_IMAGE_PIXELS, ImageError, ImageInput, check_size,
                                 load_image, normalize, open_image)

PREPROCESSOR_CONFIG = "preprocessor_config.json"
BICUBIC = 3  # PIL's Image.Resampling.BICUBIC, `resample` in llava-hf's preprocessor_config.json

# CLIPImageProcessor's defaults, for fields a preprocessor_config.json leaves out.
_CLIP_DEFAULTS = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "resample": BICUBIC,
                  "rescale_factor": 1 / 255, "image_mean": CLIP_MEAN.tolist(), "image_std": CLIP_STD.tolist()}
_FLAGS = ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb")


class LlavaImageProcessor:
    """CLIPImageProcessor's pipeline for llava-1.5: shortest edge to 336 (bicubic), centre crop 336, CLIP normalise.

    Call it with one image or a list (paths, PIL images, uint8 arrays) -> float32 [N, 3, crop_h, crop_w].
    """

    def __init__(self, shortest_edge: int = 336, crop_size: Tuple[int, int] = (336, 336), resample: int = BICUBIC,
                 max_pixels: int = MAX_IMAGE_PIXELS, mean: np.ndarray = CLIP_MEAN, std: np.ndarray = CLIP_STD) -> None:
        crop_h, crop_w = crop_size
        for name, value in (("shortest_edge", shortest_edge), ("crop height", crop_h), ("crop width", crop_w)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"image processor {name} must be a positive integer, got {value!r}")
        if crop_h > shortest_edge or crop_w > shortest_edge:
            # transformers would zero-pad; no llava checkpoint crops more than it resizes
            raise ConfigError(f"crop_size {crop_h}x{crop_w} is larger than the resized shortest edge {shortest_edge}")
        self.shortest_edge, self.crop_size, self.resample = shortest_edge, (crop_h, crop_w), resample
        self.max_pixels = max_pixels
        # float32, as transformers' normalize casts them to the image's dtype
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "LlavaImageProcessor":
        """From `path/preprocessor_config.json` (CLIPImageProcessor fields; missing ones take its defaults).

        Settings this pipeline does not implement (a do_* flag off, another rescale factor, a fixed
        height/width resize) raise ConfigError naming the file and field; image_mean / image_std are used as given.
        """
        cfg_path = os.path.join(path, PREPROCESSOR_CONFIG) if os.path.isdir(path) else path
        if not os.path.isfile(cfg_path):
            raise ConfigError(f"{cfg_path} not found")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                raw = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{cfg_path} is not valid JSON: {e}") from None
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{cfg_path}: expected a JSON object, found {type(raw).__name__}")
        cfg = {**_CLIP_DEFAULTS, **raw}
        for flag in _FLAGS:
            if cfg.get(flag, True) is not True:
                raise ConfigError(f"{cfg_path}: {flag} {cfg[flag]!r} not supported (LLaVA-1.5 uses true)")
        size, crop = cfg["size"], cfg["crop_size"]
        if isinstance(size, int):  # old configs: a bare int means the shortest edge
            size = {"shortest_edge": size}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if not isinstance(size, Mapping) or set(size) != {"shortest_edge"}:
            raise ConfigError(f"{cfg_path}: size {size!r} not supported; expected {{'shortest_edge': N}}")
        if not isinstance(crop, Mapping) or set(crop) != {"height", "width"}:
            raise ConfigError(f"{cfg_path}: crop_size {crop!r} not supported; expected {{'height': H, 'width': W}}")
        if cfg["resample"] != BICUBIC:
            raise ConfigError(f"{cfg_path}: resample {cfg['resample']!r} not supported; expected {BICUBIC} (bicubic)")
        if not np.isclose(float(cfg["rescale_factor"]), 1 / 255, rtol=1e-9, atol=0):
            raise ConfigError(f"{cfg_path}: rescale_factor {cfg['rescale_factor']!r} not supported; expected 1/255")
        stats = []
        for key in ("image_mean", "image_std"):
            value = np.asarray(cfg[key], dtype=np.float32) if isinstance(cfg[key], (list, tuple)) else None
            if value is None or value.shape != (3,) or (key == "image_std" and not (value > 0).all()):
                raise ConfigError(f"{cfg_path}: {key} {cfg[key]!r} not supported; expected 3 numbers (per RGB "
                                  "channel)" + (", all positive" if key == "image_std" else ""))
            stats.append(value)
        try:
            return cls(size["shortest_edge"], (crop["height"], crop["width"]), BICUBIC, mean=stats[0], std=stats[1],
                       **kwargs)
        except ConfigError as e:
            raise ConfigError(f"{cfg_path}: {e}") from None

    def __call__(self, images: Union[ImageInput, Sequence[ImageInput]]) -> np.ndarray:
        """Normalised pixels float32 [N, 3, crop_h, crop_w] of one image or a list of images."""
        if isinstance(images, (list, tuple)):
            if not images:
                raise ImageError("no images given")
            return np.concatenate([self.preprocess(im) for im in images])
        return self.preprocess(images)

    def preprocess(self, image: ImageInput) -> np.ndarray:
        """One image -> float32 [1, 3, crop_h, crop_w] (see the module docstring for the steps)."""
        img = self.load(image)
        w, h = img.size
        img = img.resize(resize_shortest_edge(w, h, self.shortest_edge)[::-1], resample=self.resample)
        crop_h, crop_w = self.crop_size
        top, left = (img.height - crop_h) // 2, (img.width - crop_w) // 2
        return normalize(img.crop((left, top, left + crop_w, top + crop_h)), self.mean, self.std)

    def load(self, image: ImageInput) -> Image.Image:
        """An RGB PIL image with transformers' RGB conversion (alpha dropped), size checks of `load_image`."""
        if isinstance(image, (str, os.PathLike)):
            image = open_image(os.fspath(image), self.max_pixels)  # size checked from the header before decoding
        if isinstance(image, Image.Image) and image.mode != "RGB":
            check_size(image.size, getattr(image, "filename", "") or "<PIL image>", self.max_pixels)
            try:
                image = image.convert("RGB")  # transformers' convert_to_rgb
            except (OSError, SyntaxError, ValueError, EOFError) as e:
                raise ImageError(f"image cannot be converted to RGB: {e}") from None
        return load_image(image, self.max_pixels)


def resize_shortest_edge(width: int, height: int, size: int) -> Tuple[int, int]:
    """(height, width) after resizing the shortest edge to `size`, as transformers' get_resize_output_image_size."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)
