"""`image_url` values of a request -> RGB PIL images, with the limits of `ms_xcomposer.images` (decompression bombs,
empty or unreadable images).

Accepted: `data:image/<type>;base64,<data>` URLs, and, only when the server was started with
`--allowed-local-media DIR`, local files under DIR (`file:///abs/path` or an absolute path; symlinks resolved
before the check). Remote http(s) URLs are never fetched. Each failure is an `ApiError` (400).
"""
from __future__ import annotations

import base64
import binascii
import os
from typing import Optional
from urllib.parse import unquote, urlparse

from PIL import Image

from ms_xcomposer.images import ImageError, image_from_bytes, load_image
from ms_xcomposer.server.protocol import bad


def load_image_url(url: str, allowed_local_media: Optional[str], max_pixels: int) -> Image.Image:
    """The image an `image_url` names (see the module doc)."""
    if url.startswith("data:"):
        return _data_url(url, max_pixels)
    if url.startswith(("http://", "https://")):
        raise bad("remote image URLs are not fetched by this server; send the image as a data: URL "
                  "(data:image/png;base64,...)", "image_url")
    path = unquote(urlparse(url).path) if url.startswith("file://") else url
    if allowed_local_media is None:
        raise bad("local image paths are refused: the server was not started with --allowed-local-media DIR; send "
                  "a data: URL", "image_url")
    if not os.path.isabs(path):
        raise bad(f"local image paths must be absolute, got {path!r}", "image_url")
    root = os.path.realpath(allowed_local_media)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise bad(f"{path!r} is outside the allowed local media directory", "image_url")
    if not os.path.isfile(real):
        raise bad(f"local image {path!r} not found", "image_url")
    try:
        return load_image(real, max_pixels)
    except (ImageError, OSError) as e:
        raise bad(str(e), "image_url") from None


def _data_url(url: str, max_pixels: int) -> Image.Image:
    header, sep, data = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise bad("data: URLs must be base64 encoded (data:image/png;base64,...)", "image_url")
    media_type = header[len("data:"):-len(";base64")]
    if media_type and not media_type.startswith("image/"):
        raise bad(f"the data: URL holds {media_type!r}, not an image", "image_url")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad("the data: URL's base64 is malformed", "image_url") from None
    try:
        return image_from_bytes(raw, "data: URL image", max_pixels)
    except ImageError as e:
        raise bad(str(e), "image_url") from None

