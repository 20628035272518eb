"""Image/video preprocessing against the golden official pixels, a torchvision-style reference and PyTorch."""
import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ms_xcomposer.config import ConfigError
from ms_xcomposer.models.xcomposer2 import processing as P
from ms_xcomposer.models.xcomposer2.processing import ImageError

DATA = os.path.join(os.path.dirname(__file__), "data", "ixc25_tiny")
WIDE = os.path.join(DATA, "image_wide.png")
TALL = os.path.join(DATA, "image_tall.png")
SMALL = os.path.join(DATA, "image_small.png")
WHITE = (1.0 - P.CLIP_MEAN) / P.CLIP_STD  # normalised value of a white pixel, per channel


@pytest.fixture(scope="module")
def golden():
    return np.load(os.path.join(DATA, "golden.npz"))


# ---- reference: the official transforms written the torchvision way (ImageOps.expand = F.pad, torch
# ToTensor/Normalize), with the tile search done by enumeration instead of the official while loop
def _ref_pixels(img, kind, hd_num=1):
    if kind == "resize":
        img = img.resize((490, 490), Image.BICUBIC)
    else:
        tile = 336 if kind == "hd_centre" else 560
        trans = img.width < img.height
        if trans:
            img = img.transpose(Image.TRANSPOSE)
        ratio = img.width / img.height
        scale = max(s for s in range(1, hd_num + 1) if s * np.ceil(s / ratio) <= hd_num)
        if kind == "hd_bottom":
            scale = min(int(np.ceil(img.width / tile)), scale)
        new_w = scale * tile
        new_h = int(new_w / ratio)
        img = img.resize((new_w, new_h), Image.BILINEAR)
        pad = int(np.ceil(new_h / tile) * tile) - new_h
        top = pad // 2 if kind == "hd_centre" else 0
        img = ImageOps.expand(img, border=(0, top, 0, pad - top), fill=(255, 255, 255))
        if trans:
            img = img.transpose(Image.TRANSPOSE)
    t = torch.from_numpy(np.array(img, np.uint8)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(P.CLIP_MEAN.tolist(), dtype=torch.float32)[:, None, None]
    std = torch.tensor(P.CLIP_STD.tolist(), dtype=torch.float32)[:, None, None]
    return t.sub(mean).div(std)[None].numpy()


@pytest.mark.parametrize("name,path", [("wide", WIDE), ("tall", TALL)])
@pytest.mark.parametrize("hd_num", [1, 4])
def test_golden_pixels(golden, name, path, hd_num):
    ours = P.preprocess(path, "ixc2.5", hd_num)
    want = golden[f"pixels_{name}_hd{hd_num}"]
    assert ours.dtype == np.float32 and ours.shape == want.shape
    assert np.abs(ours - want).max() <= 1e-6


def test_golden_pixels_from_pil_and_array(golden):
    img = Image.open(WIDE)
    want = golden["pixels_wide_hd4"]
    assert np.abs(P.preprocess(img, "ixc2.5", 4) - want).max() <= 1e-6
    assert np.abs(P.preprocess(np.asarray(img.convert("RGB")), "ixc2.5", 4) - want).max() <= 1e-6


def test_golden_grids():
    with open(os.path.join(DATA, "golden.json"), encoding="utf-8") as f:
        js = json.load(f)
    for name, path in (("wide", WIDE), ("tall", TALL)):
        for hd in (1, 4):
            pixels = P.preprocess(path, "ixc2.5", hd)
            assert list(P.tile_grid(pixels, P.variant_spec("ixc2.5").tile_size)) == js[f"img_{name}_hd{hd}"]["grid_hw"]


@pytest.mark.parametrize("path", [WIDE, TALL, SMALL])
@pytest.mark.parametrize("variant,kind,hd_nums", [("ixc2-vl", "resize", [1]),
                                                  ("ixc2-4khd", "hd_centre", [1, 4, 9, 25]),
                                                  ("ixc2.5", "hd_bottom", [1, 6, 24])])
def test_matches_torchvision_style_reference(path, variant, kind, hd_nums):
    img = Image.open(path).convert("RGB")
    for hd in hd_nums:
        ours = P.preprocess(path, variant, hd)
        ref = _ref_pixels(img, kind, hd)
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() <= 1e-6


def test_hd_geometry():
    # 4KHD, tall 500x900, hd 25: transposed 900x500 -> scale 6 -> 2016x1120, centred padding to 1344,
    # transposed back: 1344 wide with 112 white columns on each side
    x = P.preprocess(TALL, "ixc2-4khd", 25)
    assert x.shape == (1, 3, 2016, 1344)
    white = WHITE[None, :, None, None]
    assert np.allclose(x[..., :112], white) and np.allclose(x[..., -112:], white)
    assert not np.allclose(x[..., 112], white[..., 0]) and not np.allclose(x[..., -113], white[..., 0])
    # 2.5, wide 1000x700, hd 1: 560x392 then white rows at the bottom only
    y = P.preprocess(WIDE, "ixc2.5", 1)
    assert y.shape == (1, 3, 560, 560)
    assert np.allclose(y[..., 392:, :], white) and not np.allclose(y[..., 391, :], white[..., 0])
    # 2.5 never upscales past ceil(width / 560) tiles: 400x300 at hd 24 stays one tile wide
    assert P.preprocess(SMALL, "ixc2.5", 24).shape == (1, 3, 560, 560)
    assert P.preprocess(SMALL, "ixc2-4khd", 24).shape[-1] > 336  # 4KHD does upscale
    assert P.preprocess(WIDE, "ixc2-vl").shape == (1, 3, 490, 490)


def test_global_view_matches_torch(golden):
    for pixels, tile in ((golden["pixels_wide_hd4"], 560), (golden["pixels_tall_hd4"], 560),
                         (P.preprocess(WIDE, "ixc2-4khd", 25), 336), (golden["pixels_wide_hd1"], 336)):
        ours = P.global_view(pixels, tile)
        ref = F.interpolate(torch.from_numpy(pixels), size=(tile, tile), mode="bicubic",
                            align_corners=False).numpy()
        assert ours.shape == (1, 3, tile, tile) and ours.dtype == np.float32
        # float32 sums in another order: a few ulps of values up to ~2.2 (measured 7.2e-7)
        assert np.abs(ours - ref).max() <= 2e-6


def test_split_tiles_row_major(golden):
    pixels = golden["pixels_tall_hd4"]
    tiles = P.split_tiles(pixels, 560)
    assert tiles.shape == (4, 3, 560, 560)
    for r in range(2):
        for c in range(2):
            assert np.array_equal(tiles[r * 2 + c], pixels[0, :, r * 560:(r + 1) * 560, c * 560:(c + 1) * 560])
    assert P.tile_grid(P.preprocess(TALL, "ixc2-4khd", 25), 336) == (6, 4)
    with pytest.raises(ImageError, match="560x560 tiles"):
        P.tile_grid(pixels[..., :1000], 560)


def test_normalised_pixels_pass_through(golden):
    pixels = golden["pixels_wide_hd4"]
    assert np.array_equal(P.preprocess(pixels, "ixc2.5"), pixels)
    assert np.array_equal(P.preprocess(pixels[0].astype(np.float64), "ixc2.5"), pixels)
    bad_inputs = ((pixels[..., :1000], "ixc2.5"), (pixels[:, :2], "ixc2.5"),
                  (pixels[:, :, :560, :560], "ixc2-vl"), (pixels[None], "ixc2.5"))
    for bad, variant in bad_inputs:
        with pytest.raises(ImageError, match="expects|must be"):
            P.preprocess(bad, variant)


# ---- modes -------------------------------------------------------------------------------------------
def _rgba_half_transparent():
    arr = np.zeros((6, 8, 4), np.uint8)
    arr[:, :4] = (200, 10, 20, 255)  # opaque red on the left
    arr[:, 4:] = (0, 0, 0, 0)  # transparent black on the right
    return Image.fromarray(arr, "RGBA")


def test_transparency_becomes_white(tmp_path):
    rgba = _rgba_half_transparent()
    out = np.asarray(P.load_image(rgba))
    assert (out[:, :4] == (200, 10, 20)).all() and (out[:, 4:] == 255).all()
    la = rgba.convert("LA")
    out = np.asarray(P.load_image(la))
    assert (out[:, 4:] == 255).all() and (out[:, :4] == out[0, 0, 0]).all() and out[0, 0, 0] < 255
    # palette image whose index 0 is transparent, saved and read back as a PNG file
    p = Image.new("P", (8, 6), 0)
    p.putpalette([0, 0, 0, 30, 60, 90] + [0] * 762)
    p.paste(1, (0, 0, 4, 6))
    p.info["transparency"] = 0
    path = tmp_path / "p.png"
    p.save(path, transparency=0)
    assert Image.open(path).mode == "P"
    out = np.asarray(P.load_image(str(path)))
    assert (out[:, :4] == (30, 60, 90)).all() and (out[:, 4:] == 255).all()
    # semi-transparent: blended with white
    half = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    assert abs(int(np.asarray(P.load_image(half))[0, 0, 0]) - 127) <= 1


def test_other_modes(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8))
    grey = rgb.convert("L")
    assert np.array_equal(np.asarray(P.load_image(grey)), np.repeat(np.asarray(grey)[..., None], 3, axis=2))
    cmyk = rgb.convert("CMYK")
    path = tmp_path / "c.jpg"
    cmyk.save(path)
    assert Image.open(path).mode == "CMYK"
    assert np.array_equal(np.asarray(P.load_image(str(path))), np.asarray(Image.open(path).convert("RGB")))
    assert P.load_image(rgb.convert("1")).mode == "RGB"
    # 16-bit greyscale PNG: scaled to 8 bits, not clipped
    arr16 = np.array([[0, 257, 32896, 65535]], np.uint16)
    path16 = tmp_path / "g16.png"
    Image.fromarray(arr16).save(path16)
    assert Image.open(path16).mode.startswith("I;16")
    assert np.asarray(P.load_image(str(path16)))[0, :, 0].tolist() == [0, 1, 128, 255]
    x = P.preprocess(str(path16), "ixc2.5", 1)
    assert x.shape == (1, 3, 560, 560)
    assert P.load_image(np.zeros((5, 4), np.uint8)).size == (4, 5)
    assert P.load_image(np.zeros((5, 4, 1), np.uint8)).mode == "RGB"
    assert (np.asarray(P.load_image(np.asarray(_rgba_half_transparent())))[:, 4:] == 255).all()


# ---- errors ------------------------------------------------------------------------------------------
def test_bad_files(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(os.urandom(2000))
    with pytest.raises(ImageError, match="junk.png.*not a readable image"):
        P.preprocess(str(junk), "ixc2.5")
    text = tmp_path / "notes.jpg"
    text.write_text("hello, not an image")
    with pytest.raises(ImageError, match="notes.jpg"):
        P.preprocess(str(text), "ixc2-vl")
    truncated = tmp_path / "trunc.png"
    data = open(WIDE, "rb").read()
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError, match="trunc.png"):
        P.preprocess(str(truncated), "ixc2.5")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        P.preprocess(str(tmp_path / "missing.png"), "ixc2.5")


def test_zero_size_images():
    with pytest.raises(ImageError, match="empty image"):
        P.preprocess(Image.new("RGB", (0, 10)), "ixc2.5")
    with pytest.raises(ImageError, match="empty"):
        P.preprocess(np.zeros((0, 5, 3), np.uint8), "ixc2.5")


def test_pixel_limit(tmp_path):
    with pytest.raises(ImageError, match=r"image_wide.png.*1000x700 = 700000 pixels, over the limit of 100000"):
        P.preprocess(WIDE, "ixc2.5", max_pixels=100_000)
    with pytest.raises(ImageError, match="over the limit"):
        P.preprocess(Image.new("RGB", (400, 300)), "ixc2.5", max_pixels=1000)
    # the size comes from the header, before decoding: a huge image with no pixel data is refused as too large
    big = tmp_path / "big.png"
    Image.new("1", (10000, 9000)).save(big)  # 90e6 pixels: just over the default limit
    with open(big, "r+b") as f:
        f.truncate(200)
    with pytest.raises(ImageError, match="big.png.*decompression bomb"):
        P.preprocess(str(big), "ixc2.5")
    assert P.MAX_IMAGE_PIXELS < 10000 * 9000


def test_bad_arguments():
    with pytest.raises(ImageError, match="uint8"):
        P.preprocess(np.zeros((4, 4, 3), np.uint16), "ixc2.5")
    with pytest.raises(ImageError, match="shape"):
        P.preprocess(np.zeros((4, 4, 5), np.uint8), "ixc2.5")
    with pytest.raises(ConfigError, match="unknown variant"):
        P.preprocess(WIDE, "ixc3")
    with pytest.raises(ImageError, match="hd_num"):
        P.preprocess(WIDE, "ixc2.5", 0)
    with pytest.raises(ImageError, match="expected an image path"):
        P.preprocess(12345, "ixc2.5")
    with pytest.raises(ImageError, match="too elongated"):
        P.preprocess(Image.new("RGB", (100000, 1)), "ixc2.5", 24)


# ---- video -------------------------------------------------------------------------------------------
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def _frames(n, size=(160, 90)):
    return [Image.new("RGB", size, COLOURS[i % len(COLOURS)]) for i in range(n)]


def test_canvas_landscape_layout():
    canvas = np.asarray(P.frames_to_canvas(_frames(3)))
    # 160x90 -> 1120x630; stacked with a 40-pixel label band above each and 10 pixels between
    assert canvas.shape == (3 * (630 + 50), 1120, 3)
    for i in range(3):
        top = i * 680 + 40
        assert (canvas[top:top + 630] == COLOURS[i]).all()
        band = canvas[i * 680:top]
        assert (band < 128).any() and (band == 255).mean() > 0.8  # a dark label on white
    assert (canvas[675:677] == 0).all() and (canvas[1355:1357] == 0).all()  # separator lines
    assert (canvas[670:675] == 255).all() and (canvas[-10:] == 255).all()  # no line after the last frame


def test_canvas_portrait_layout():
    canvas = np.asarray(P.frames_to_canvas(_frames(2, size=(90, 160))))
    # 90x160 -> 630x1120, side by side, labels above, vertical line in the 10-pixel gap
    assert canvas.shape == (1120 + 40, 2 * (630 + 10), 3)
    assert (canvas[40:, :630] == COLOURS[0]).all() and (canvas[40:, 640:1270] == COLOURS[1]).all()
    assert (canvas[:, 635:637] == 0).all() and (canvas[40:, 630:635] == 255).all()
    assert (canvas[:40, :630] < 128).any()


def test_canvas_orientation_follows_last_frame():
    # as the official frame2img: the layout is chosen from the last frame's shape
    mixed = [Image.new("RGB", (90, 160), COLOURS[0]), Image.new("RGB", (160, 90), COLOURS[1])]
    assert P.frames_to_canvas(mixed).size == (1120, 1120 + 630 + 2 * 50)  # stacked: landscape layout
    assert P.frames_to_canvas(mixed[::-1]).size == (1120 + 630 + 2 * 10, 1120 + 40)  # side by side


def test_canvas_font_path(tmp_path):
    with pytest.raises(ImageError, match="nofont.ttf"):
        P.frames_to_canvas(_frames(1), font_path=str(tmp_path / "nofont.ttf"))
    fonts = [os.path.join(d, f) for d, _, fs in os.walk("/usr/share/fonts") for f in fs if f.endswith(".ttf")]
    if not fonts:
        pytest.skip("no TrueType font installed to load by path")
    default = np.asarray(P.frames_to_canvas(_frames(1)))
    custom = np.asarray(P.frames_to_canvas(_frames(1), font_path=fonts[0]))
    assert default.shape == custom.shape
    assert not np.array_equal(default[:40], custom[:40]) and np.array_equal(default[40:], custom[40:])


def test_video_transform_shapes():
    land = P.video_transform(Image.new("RGB", (1120, 4080), "white"))  # tall canvas: width 560
    assert land.size == (560, 2240)
    wide = P.video_transform(Image.new("RGB", (1920, 1160), "white"))  # wide canvas: height 560
    assert wide.size == (1120, 560)
    a = np.asarray(P.video_transform(Image.new("RGB", (1500, 700), (0, 0, 0))))
    # 1500x700 -> 1200x560, padded on the right with white to 1680
    assert a.shape == (560, 1680, 3) and (a[:, :1200] == 0).all() and (a[:, 1200:] == 255).all()


def test_frame_list_sampling():
    frames = [Image.new("RGB", (32, 24), (i, 0, 0)) for i in range(40)]
    out = P.load_video_frames(frames)
    assert len(out) == 32
    assert [np.asarray(f)[0, 0, 0] for f in out] == [int(i * 40 / 33) for i in range(32)]
    assert len(P.load_video_frames(frames[:5])) == 5
    assert len(P.load_video_frames(frames, max_frames=8)) == 8
    with pytest.raises(ImageError, match="no video frames"):
        P.load_video_frames([])


def test_gif_sampled_at_one_fps(tmp_path):
    frames = [Image.new("RGB", (64, 48), COLOURS[i % 6]) for i in range(12)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=250, loop=0)  # 4 fps
    out = P.load_video_frames(str(path))
    assert [tuple(np.asarray(f)[0, 0]) for f in out] == [COLOURS[0], COLOURS[4], COLOURS[2]]  # frames 0, 4, 8
    x = P.preprocess_video(str(path))
    assert x.dtype == np.float32 and x.shape[:2] == (1, 3) and x.shape[2] % 560 == 0 and x.shape[3] % 560 == 0
    # 350 ms a frame = 2.86 fps: every round(2.86) = 3rd frame is kept
    path2 = tmp_path / "anim2.gif"
    frames[0].save(path2, save_all=True, append_images=frames[1:9], duration=350, loop=0)
    out = P.load_video_frames(str(path2))
    assert [tuple(np.asarray(f)[0, 0]) for f in out] == [COLOURS[0], COLOURS[3], COLOURS[0]]  # frames 0, 3, 6
    # a .gif path given to preprocess is one image (its first frame), as in the official code
    assert P.preprocess(str(path), "ixc2.5", 1).shape == (1, 3, 560, 560)


def test_video_chain_from_frames():
    x = P.preprocess_video(_frames(3))
    # canvas 1120x2040 (portrait) -> 560 wide, 1020 tall, padded to 1120
    assert x.shape == (1, 3, 1120, 560)
    assert np.allclose(x[..., 1020:, :], WHITE[None, :, None, None])
    with pytest.raises(ImageError, match="only IXC-2.5"):
        P.preprocess_video(_frames(3), "ixc2-4khd")


def _write_video(path, n, fps):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), COLOURS[i % 6], np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_file_with_pyav(tmp_path):
    path = tmp_path / "clip.mp4"
    _write_video(path, 12, 4)
    out = P.load_video_frames(str(path))
    colours = [np.asarray(f)[20, 20].astype(int) for f in out]
    assert len(out) == 3  # 4 fps, 12 frames: frames 0, 4, 8
    for got, want in zip(colours, [COLOURS[0], COLOURS[4], COLOURS[2]]):
        assert np.abs(got - want).max() <= 8  # lossy codec
    assert P.preprocess(str(path), "ixc2.5").shape == (1, 3, 1680, 560)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(ImageError, match="bad.mp4"):
        P.load_video_frames(str(bad))


def test_video_file_without_pyav(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00" * 100)
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` fail
    with pytest.raises(ImageError, match="clip.mp4.*pip install av"):
        P.preprocess(str(path), "ixc2.5")
    with pytest.raises(ImageError, match="does not take videos"):
        P.preprocess(str(path), "ixc2-vl")
