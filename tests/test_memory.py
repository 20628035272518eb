"""The memory estimate (ms_xcomposer/memory.py) against a measured peak RSS, and the HD grid it is given.

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
                          weight_dtype="float32", weight_bytes=weights, image_grids=[grid])
    ratio = measured["rise"] / (est.activation + 2 * est.kv_cache)
    assert 1 / OVER <= ratio <= UNDER, (ratio, measured)


@pytest.mark.parametrize("kind, tile", [("hd_bottom", 560), ("hd_centre", 336)])
def test_hd_grid_is_the_grid_hd_transform_makes(kind, tile):
    for size in ((1000, 700), (700, 1000), (4000, 3000), (560, 560), (3000, 200), (100, 2000), (13, 7)):
        for hd in (1, 4, 6, 24, 25):
            canvas = hd_transform(Image.new("RGB", size), hd, tile, kind)
            assert hd_grid(size, hd, tile, kind) == (canvas.height // tile, canvas.width // tile), (size, hd)
