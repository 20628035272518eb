"""The memory estimate (ms_xcomposer/memory.py) against a measured peak RSS, and the HD grid it is given; the
InternVL and LLaVA estimates (their `vision_memory` hooks) against numbers computed here from their tiny configs,
as `info --estimate` and `chat`'s pre-check print them.

Judge: the peak resident set size of a fresh process (VmHWM, reset just before the chat: getrusage's ru_maxrss
would carry the pytest process's high-water mark across fork and exec) during one chat on the tiny IXC-2.5
model, above its RSS just before the chat (model loaded, warmed up), at two prompt lengths (the attention term is
quadratic in them) and in both modes. The estimate (activation + two KV caches) guards a refusal, so it may
overestimate more than it underestimates: the measured rise must lie between 1/2 and 1.5 times the estimate.
"""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from ms_xcomposer import memory
from ms_xcomposer.models.xcomposer2 import FAMILY
from ms_xcomposer.models.xcomposer2.config import preset
from ms_xcomposer.models.xcomposer2.memory import grid_load
from ms_xcomposer.models.xcomposer2.processing import hd_grid, hd_transform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVER, UNDER = 2.0, 1.5  # the estimate may be up to 2x the measured rise, or down to 1/1.5 of it

MEASURE = r"""
import json, os, sys
os.environ.setdefault("GLOG_v", "3")
import psutil
from ms_xcomposer import chat, load
from ms_xcomposer.memory import peak_rss, reset_peak_rss

model_dir, image, mode, hd = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model, processor = load(model_dir, device="CPU", mode=mode)
options = dict(do_sample=False, max_new_tokens=2, repetition_penalty=1.0)
chat(model, processor, "hi", [image], hd_num=1, **options)  # warm-up: allocator pools, first kernels, graphs
before = psutil.Process().memory_info().rss
reset_peak_rss()  # (ru_maxrss would include the parent pytest process's peak: Linux carries it across exec)
chat(model, processor, "hi", [image], hd_num=hd, **options)
rise = peak_rss() - before
rows = int(processor.prepare(model, "hi", [image], hd_num=hd).inputs_embeds.shape[1])
print(json.dumps({"rise": rise, "rows": rows}))
"""


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 2240x1680 (4:3) image: 2x2 tiles at hd_num 4 (2061 image rows), 3x4 tiles at hd_num 12 (5281)."""
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.new("RGB", (2240, 1680), "white").save(path)
    return str(path)


@pytest.mark.parametrize("mode, hd, grid", [("pynative", 4, (2, 2)), ("pynative", 12, (3, 4)), ("graph", 12, (3, 4))])
def test_estimate_is_within_a_factor_of_the_measured_peak(converted, photo, mode, hd, grid):
    """One chat per fresh process (a second call in the same process reuses the first one's pools).

    Measured / estimated on this CPU: PyNative 0.70-0.77 (hd 4; once below 0.67, with other jobs on the
    machine) and 0.84-1.03 (hd 12), GRAPH 1.0-1.26 (hd 12). PyNative reuses the warm-up's pooled memory for a
    small prompt, so fewer score-sized copies are fresh; GRAPH holds more copies and compiles the new tile
    grid's graph in the measured call. With the prefill in 256-row chunks (issue 10) the vision tower's
    attention is the larger term at both sizes: 0.80 (PyNative hd 4), 1.08 (PyNative hd 12), 1.15 (GRAPH hd 12).
    The peak is VmHWM reset just before the chat: ru_maxrss would include the pytest process's own peak, which
    Linux carries into a child across fork + exec."""
    env = {k: v for k, v in os.environ.items() if k != "GLOG_v"}
    run = subprocess.run([sys.executable, "-c", MEASURE, converted, photo, mode, str(hd)], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr
    measured = json.loads(run.stdout)
    config = preset("tiny-ixc2.5")
    weights = memory.parameter_bytes(FAMILY.parameter_shapes(config), "float32")
    est = memory.estimate(config, prompt_rows=measured["rows"], max_new_tokens=2, compute_dtype="float32",
                          weight_dtype="float32", weight_bytes=weights,
                          vision_activation=grid_load(config, [grid], 4).activation)
    ratio = measured["rise"] / (est.activation + 2 * est.kv_cache)
    assert 1 / OVER <= ratio <= UNDER, (ratio, measured)


@pytest.mark.parametrize("kind, tile", [("hd_bottom", 560), ("hd_centre", 336)])
def test_hd_grid_is_the_grid_hd_transform_makes(kind, tile):
    for size in ((1000, 700), (700, 1000), (4000, 3000), (560, 560), (3000, 200), (100, 2000), (13, 7)):
        for hd in (1, 4, 6, 24, 25):
            canvas = hd_transform(Image.new("RGB", size), hd, tile, kind)
            assert hd_grid(size, hd, tile, kind) == (canvas.height // tile, canvas.width // tile), (size, hd)


# ---- the other families' vision side: numbers from the configs, computed here ----------------------------------
INTERNVL_DATA = os.path.join(ROOT, "tests", "data", "internvl15_tiny")
MEMORY_PROBE = ("import sys, psutil\n"  # the chat command with the available memory reported as argv[1] bytes
                "real = psutil.virtual_memory\n"
                "psutil.virtual_memory = lambda: real()._replace(available=int(sys.argv[1]))\n"
                "from ms_xcomposer.cli import main\n"
                "sys.exit(main(sys.argv[2:]))\n")


def _cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "GLOG_v"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def _weight_bytes(directory: str) -> int:
    """float32 bytes of every tensor the safetensors library finds in `directory`."""
    from safetensors import safe_open

    count = 0
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), "np") as f:
                for key in f.keys():
                    n = 1
                    for d in f.get_slice(key).get_shape():
                        n *= d
                    count += n
    return 4 * count


def _expected(weights, rows, new, layers, kv_heads, head_dim, heads, hidden, ffn, vocab, vision):
    """The memory.py formula written out: float32, batch 1, chunks of 256 rows, capacities in steps of 256."""
    capacity = -(-(rows + new) // 256) * 256
    kv = 2 * layers * kv_heads * capacity * head_dim * 4
    chunk = min(rows, 256)
    prefill = int(4.5 * heads * chunk * capacity * 4) + chunk * (3 * ffn + (heads + 2 * kv_heads) * head_dim
                                                                + 4 * hidden) * 4 + rows * hidden * 4 + vocab * 4
    activation = max(vision, prefill)
    return dict(weights=weights, kv_cache=kv, activation=activation, prompt_rows=rows, capacity=capacity,
                total=max(int(weights * 1.1), weights + 2 * kv + activation))


def test_internvl_estimate_from_its_config():
    """The golden InternVL (CASE.md): InternViT 448 px / patch 14 (1025 tokens per tile), width 64, 4 heads, FFN 128;
    InternLM2 2 layers, hidden 64, 4 heads, 2 KV heads of 16, FFN 128, vocab 92553. --max-num 3: 3 tiles + the
    thumbnail, 256 rows each + <img> </img>; all tiles in one ViT call (4 float32 score copies, measured below)."""
    hf = os.path.join(INTERNVL_DATA, "hf")
    out = _cli("-m", "ms_xcomposer", "info", hf, "--estimate", "--max-num", "3", "--max-new-tokens", "100",
               "--dtype", "float32", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    image_rows = 4 * 256 + 2
    vision = 4 * 4 * 4 * 1025 * 1025 * 4 + 4 * 1025 * (128 + 4 * 64) * 4
    want = _expected(_weight_bytes(hf), image_rows + 256, 100, 2, 2, 16, 4, 64, 128, 92553, vision)
    assert {k: got[k] for k in want} == want and got["max_num"] == 3 and got["activation"] == vision
    text = _cli("-m", "ms_xcomposer", "info", hf, "--estimate", "--max-new-tokens", "100", "--dtype", "float32")
    assert text.returncode == 0, text.stderr
    first = text.stdout.splitlines()[0]
    assert first.endswith(f"InternVL-1.5, memory of one chat (float32 weights and compute, batch 1): one image "
                          f"(max_num 6, 7 tiles with the thumbnail: {7 * 256 + 2} rows) + 256 text rows, "
                          "100 new tokens"), first
    wrong = _cli("-m", "ms_xcomposer", "info", hf, "--estimate", "--hd-num", "4")
    assert (wrong.returncode, wrong.stderr) == (
        2, "error: --hd-num does not apply to the internvl family (its image option is --max-num)\n")


def test_internvl_chat_precheck_uses_the_estimate(tmp_path):
    """`chat` on a converted InternVL directory refuses a request over the available memory, naming the figures
    computed here: two images at --max-num 2 (3 tiles each, 6 in one ViT call) and the query's bytes."""
    from ms_xcomposer.conversion.convert import convert

    model_dir = str(tmp_path / "internvl")
    convert(os.path.join(INTERNVL_DATA, "hf"), model_dir)
    image = os.path.join(INTERNVL_DATA, "image_small.png")
    out = _cli("-c", MEMORY_PROBE, "300000000", "chat", model_dir, "--query", "hi", "--image", image, "--image", image,
               "--max-num", "2", "--max-new-tokens", "4", "--dtype", "float32")
    assert out.returncode == 2, out.stderr
    rows = 2 * (3 * 256 + 2) + 256 + len(b"hi")
    vision = 4 * 6 * 4 * 1025 * 1025 * 4 + 6 * 1025 * (128 + 4 * 64) * 4
    want = _expected(_weight_bytes(os.path.join(INTERNVL_DATA, "hf")), rows, 4, 2, 2, 16, 4, 64, 128, 92553, vision)
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    assert (f"(weights {gb(want['weights'])} + KV cache 2 x {gb(want['kv_cache'])} + activation "
            f"{gb(want['activation'])} (a prompt of {rows} rows)") in out.stderr.splitlines()[-1], out.stderr


INTERNVL_MEASURE = r"""
import json, os, sys
os.environ.setdefault("GLOG_v", "3")
import psutil
from ms_xcomposer import chat, load
from ms_xcomposer.memory import peak_rss, reset_peak_rss

model_dir, image, mode, max_num = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model, processor = load(model_dir, device="CPU", mode=mode)
options = dict(do_sample=False, max_new_tokens=2, repetition_penalty=1.0)
chat(model, processor, "hi", [image], max_num=1, **options)  # warm-up: pools, kernels, the graphs (T is dynamic)
before = psutil.Process().memory_info().rss
reset_peak_rss()
chat(model, processor, "hi", [image], max_num=max_num, **options)
rise = peak_rss() - before
rows = int(processor.prepare(model, "hi", [image], max_num=max_num).inputs_embeds.shape[1])
print(json.dumps({"rise": rise, "rows": rows}))
"""


@pytest.fixture(scope="module")
def internvl_dir(tmp_path_factory):
    from ms_xcomposer.conversion.convert import convert

    dst = str(tmp_path_factory.mktemp("internvl") / "ms")
    convert(os.path.join(INTERNVL_DATA, "hf"), dst)
    return dst


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_internvl_estimate_is_within_a_factor_of_the_measured_peak(internvl_dir, mode):
    """The 640x480 golden image at max_num 12 (4x3 + thumbnail: 13 tiles through InternViT at once), in a fresh
    process: measured / estimated 0.66 (PyNative) and 1.12 (GRAPH) on this CPU."""
    from ms_xcomposer.models.internvl.memory import VISION_MEMORY

    out = _cli("-c", INTERNVL_MEASURE, internvl_dir, os.path.join(INTERNVL_DATA, "image_wide.png"), mode, "12")
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout)
    from ms_xcomposer.conversion.readers import open_checkpoint

    with open_checkpoint(internvl_dir) as reader:
        config = reader.config
    vision = VISION_MEMORY.worst(config, 1, 12, 4)
    est = memory.estimate(config, prompt_rows=measured["rows"], max_new_tokens=2, compute_dtype="float32",
                          weight_dtype="float32", weight_bytes=0, vision_activation=vision.activation)
    ratio = measured["rise"] / (est.activation + 2 * est.kv_cache)
    assert 1 / OVER <= ratio <= UNDER, (ratio, measured)


def test_llava_estimate_from_its_config(tmp_path):
    """The demo's tiny LLaVA (models/llava/synthetic.py): CLIP 112 px / patch 14 (64 image rows, 65 tokens),
    width 64, 2 heads, FFN 128; LLaMA 2 layers, hidden 128, 4 heads, 2 KV heads of 32, FFN 256, vocab 1002."""
    from ms_xcomposer.models.llava.synthetic import write_random_checkpoint

    hf = str(tmp_path / "llava")
    os.makedirs(hf)
    write_random_checkpoint(hf)
    out = _cli("-m", "ms_xcomposer", "info", hf, "--estimate", "--max-new-tokens", "50", "--dtype", "float32",
               "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    vision = 3 * 1 * 2 * 65 * 65 * 4 + 65 * (128 + 4 * 64) * 4
    want = _expected(_weight_bytes(hf), 64 + 256, 50, 2, 2, 32, 4, 128, 256, 1002, vision)
    assert {k: got[k] for k in want} == want and got["vision_activation"] == vision
    # chat's pre-check (the HF directory read directly): two images, one ViT call of 2 views, the query's bytes
    image = os.path.join(INTERNVL_DATA, "image_small.png")
    out = _cli("-c", MEMORY_PROBE, "1000000", "chat", hf, "--query", "hi", "--image", image, "--image", image,
               "--max-new-tokens", "4", "--dtype", "float32")
    assert out.returncode == 2, out.stderr
    rows = 2 * 64 + 256 + 2
    vision = 3 * 2 * 2 * 65 * 65 * 4 + 2 * 65 * (128 + 4 * 64) * 4
    want = _expected(_weight_bytes(hf), rows, 4, 2, 2, 32, 4, 128, 256, 1002, vision)
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    assert (f"(weights {gb(want['weights'])} + KV cache 2 x {gb(want['kv_cache'])} + activation "
            f"{gb(want['activation'])} (a prompt of {rows} rows)") in out.stderr.splitlines()[-1], out.stderr
