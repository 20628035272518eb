"""Parity of the MindSpore CLIP vision tower with transformers' PyTorch CLIPVisionModel (4.57.1).

Reference: HF `CLIPVisionModel(...)(pixels, output_hidden_states=True, interpolate_pos_encoding=True)
.hidden_states[-1][:, 1:]`, eager attention, fp32, with the same random weights copied across by name.
Every parameter is randomised (LayerNorm affine and biases too, unlike HF's init) so each one matters.

Measured on the development machine (max abs / rel Frobenius; bounds in ms_xcomposer/tolerances.py), outputs up to ~6.8:
- fp32, 336 (stored grid) b2: 5.3e-6 / 5.4e-7; 490 (grid 24 -> 35 interpolated) b1: 6.4e-6 / 5.7e-7;
  560 (24 -> 40) b2: 7.4e-6 / 5.7e-7; 350x500 (25x35 grid, partial patches cropped) b1: 5.4e-6 / 5.6e-7.
  PyNative and GRAPH give identical numbers.
- bf16- / fp16-stored weights, fp32 compute, vs torch fp32 on the same rounded weights: 5.5e-6 / 5.0e-6 max abs,
  5.5e-7 rel.
- fp16 compute, fp32 / fp16 / bf16 weights, 336-560: max abs 6.7e-3..8.4e-3, rel 7.0e-4..7.8e-4, i.e. about
  1.5x fp16's unit roundoff 2**-11 = 4.9e-4: every activation is stored in fp16 (LayerNorm and softmax run in
  fp32), and the residual stream carries those roundings through the layers. (bf16 weights with fp16 compute
  are not tested: the tolerance table has no such row yet.)
- golden IXC-2.5 tiny checkpoint (bf16 weights, official PyTorch code), fp32 compute: 7.6e-6 on features up to 6.5.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Tuple

import numpy as np
import pytest
import torch
import mindspore as ms
from safetensors import safe_open
from transformers import CLIPVisionConfig, CLIPVisionModel as HFCLIPVisionModel

from ms_xcomposer.models.xcomposer2.config import VIT_PREFIX, VisionConfig, infer_vision_config
from ms_xcomposer.models.clip import PositionEmbedding, VisionTower
from tolerances import assert_close

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "data", "ixc25_tiny")
ST_DIR = os.path.join(GOLDEN_DIR, "hf_safetensors")
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
            image_size=336, patch_size=14)
MS_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# (height, width, batch): the stored grid, two interpolated square sizes, and a non-square input whose
# sides are not multiples of the patch (HF's conv drops the remainder; the grid is resized to 25x35).
CASES = [(336, 336, 2), (490, 490, 1), (560, 560, 2), (350, 500, 1)]


def _hf_model(seed: int, weight_dtype: str) -> HFCLIPVisionModel:
    """HF tower with every parameter random, rounded to `weight_dtype` and kept in fp32 for the reference."""
    cfg = CLIPVisionConfig(hidden_act="quick_gelu", layer_norm_eps=1e-5, attn_implementation="eager", **TINY)
    model = HFCLIPVisionModel(cfg).eval()
    rng = np.random.RandomState(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "layrnorm.weight" in name \
                    or "post_layernorm.weight" in name:
                v = 1.0 + 0.2 * rng.randn(*p.shape)
            elif name.endswith(".bias"):
                v = 0.1 * rng.randn(*p.shape)
            elif "embedding" in name and "patch" not in name:
                v = 0.5 * rng.randn(*p.shape)  # class and position embeddings
            else:  # projections and the patch kernel: unit-variance outputs
                fan_in = int(np.prod(p.shape[1:]))
                v = rng.randn(*p.shape) / np.sqrt(fan_in)
            p.copy_(torch.from_numpy(v.astype(np.float32)).to(TORCH_DTYPES[weight_dtype]).float())
    return model


def _ms_tower(hf: HFCLIPVisionModel, weight_dtype: str) -> VisionTower:
    tower = VisionTower(VisionConfig(**TINY), MS_DTYPES[weight_dtype])
    state = hf.state_dict()
    for name, p in tower.parameters_and_names():
        key = name[len("vision_tower."):]
        p.set_data(ms.Tensor(state[key].numpy()).astype(MS_DTYPES[weight_dtype]))
    return tower


class Pair:
    """A torch reference and the MindSpore tower with the same weights; reference outputs cached."""

    def __init__(self, weight_dtype: str, seed: int = 0):
        self.hf = _hf_model(seed, weight_dtype)
        self.tower = _ms_tower(self.hf, weight_dtype)
        self._ref: Dict[Tuple[int, int, int], Tuple[torch.Tensor, ...]] = {}

    def reference(self, h: int, w: int, b: int) -> Tuple[torch.Tensor, ...]:
        if (h, w, b) not in self._ref:
            with torch.no_grad():
                out = self.hf(torch.from_numpy(_pixels(h, w, b)), output_hidden_states=True,
                              interpolate_pos_encoding=True)
            self._ref[(h, w, b)] = out.hidden_states
        return self._ref[(h, w, b)]


def _pixels(h: int, w: int, b: int) -> np.ndarray:
    return np.random.RandomState(h * 1000 + w + b).randn(b, 3, h, w).astype(np.float32)


@pytest.fixture(scope="module")
def fp32_pair() -> Pair:
    return Pair("float32")


@pytest.fixture(scope="module")
def pairs(fp32_pair) -> Dict[str, Pair]:
    return {"float32": fp32_pair, "bfloat16": Pair("bfloat16"), "float16": Pair("float16")}


# ---- structure ------------------------------------------------------------------------------------------
def _checkpoint_vit_map() -> Dict[str, str]:
    """{key: shard path} of the golden checkpoint's vision-tower tensors."""
    with open(os.path.join(ST_DIR, "model.safetensors.index.json"), encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    return {k: os.path.join(ST_DIR, shard) for k, shard in weight_map.items() if k.startswith("vit.")}


def _checkpoint_vit_shapes() -> Dict[str, Tuple[int, ...]]:
    shapes = {}
    for key, path in _checkpoint_vit_map().items():
        with safe_open(path, "np") as fh:
            shapes[key] = tuple(fh.get_slice(key).get_shape())
    return shapes


def test_parameter_names_and_shapes_equal_checkpoint_keys():
    shapes = _checkpoint_vit_shapes()
    assert len(shapes) == 39
    tower = VisionTower(infer_vision_config(shapes), ms.bfloat16, post_layernorm=True)
    ours = {"vit." + name: tuple(p.shape) for name, p in tower.parameters_and_names()}
    assert all(k.startswith(VIT_PREFIX) for k in ours)
    assert sorted(ours) == sorted(shapes)
    assert ours == shapes
    assert all(p.dtype == ms.bfloat16 for p in tower.get_parameters())


def test_without_post_layernorm_has_no_such_keys():
    names = [n for n, _ in VisionTower(VisionConfig(**TINY), post_layernorm=False).parameters_and_names()]
    assert not [n for n in names if "post_layernorm" in n]
    assert "vision_tower.vision_model.pre_layrnorm.weight" in names and len(names) == 37


def test_pos_resize_none_for_stored_grid_and_cached():
    tower = VisionTower(VisionConfig(**TINY))
    assert tower.pos_resize(336, 336) is None
    assert tower.pos_resize(340, 347) is None  # still a 24x24 patch grid
    wh, ww = tower.pos_resize(350, 500)
    assert wh.shape == (25, 24) and ww.shape == (35, 24) and wh.dtype == ms.float32
    assert tower.pos_resize(350, 500) is tower.pos_resize(350, 500)
    with pytest.raises(ValueError, match="smaller than one 14x14 patch"):
        tower.pos_resize(10, 336)


# ---- position embeddings alone ---------------------------------------------------------------------------
def test_position_embeddings_match_hf_interpolation(ms_mode, fp32_pair):
    """The resized table equals HF's `interpolate_pos_encoding` (class row kept) for a non-square grid.

    Measured: max abs 1.3e-6, rel 4.0e-7 on values up to 2 (the order of fp32 sums differs from torch's kernel).
    """
    hf_emb = fp32_pair.hf.vision_model.embeddings
    cell = PositionEmbedding(VisionConfig(**TINY).num_positions, TINY["hidden_size"])
    cell.weight.set_data(ms.Tensor(hf_emb.position_embedding.weight.detach().numpy()))
    h, w = 350, 500
    with torch.no_grad():
        dummy = torch.zeros(1, 1 + (h // 14) * (w // 14), TINY["hidden_size"])
        expected = hf_emb.interpolate_pos_encoding(dummy, h, w)[0]
    actual = cell(fp32_pair.tower.pos_resize(h, w))
    assert actual.shape == (1 + 25 * 35, TINY["hidden_size"])
    assert_close(actual, expected, ("float32", "float32"), f"interpolated position table ({ms_mode})")


# ---- whole tower -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("h,w,b", CASES, ids=[f"{h}x{w}_b{b}" for h, w, b in CASES])
def test_fp32_matches_hf(ms_mode, fp32_pair, h, w, b):
    tower = fp32_pair.tower
    out = tower(ms.Tensor(_pixels(h, w, b)), tower.pos_resize(h, w))
    expected = fp32_pair.reference(h, w, b)[-1][:, 1:]
    assert out.shape == (b, (h // 14) * (w // 14), TINY["hidden_size"]) and out.dtype == ms.float32
    assert_close(out, expected, ("float32", "float32"), f"CLIP features {h}x{w} b{b} ({ms_mode})")


def test_hidden_states_match_hf(ms_mode, fp32_pair):
    """`encode(..., output_hidden_states=True)`: HF's tuple (pre_layrnorm output, then each layer), with CLS."""
    h, w, b = CASES[0]
    tower = fp32_pair.tower
    features, states = tower.encode(ms.Tensor(_pixels(h, w, b)), output_hidden_states=True)
    expected = fp32_pair.reference(h, w, b)
    assert len(states) == len(expected) == TINY["num_hidden_layers"] + 1
    for i, (s, e) in enumerate(zip(states, expected)):
        assert_close(s, e, ("float32", "float32"), f"hidden state {i} ({ms_mode})")
    np.testing.assert_array_equal(features.asnumpy(), states[-1].asnumpy()[:, 1:])


@pytest.mark.parametrize("weight_dtype", ["bfloat16", "float16"])
def test_low_precision_weights_fp32_compute(ms_mode, pairs, weight_dtype):
    """Weights stay bf16/fp16 in the Cell, are upcast per call; reference = torch fp32 on the rounded weights."""
    pair = pairs[weight_dtype]
    h, w, b = CASES[0]
    out = pair.tower(ms.Tensor(_pixels(h, w, b)), None)
    assert out.dtype == ms.float32
    assert all(p.dtype == MS_DTYPES[weight_dtype] for p in pair.tower.get_parameters())
    assert_close(out, pair.reference(h, w, b)[-1][:, 1:], (weight_dtype, "float32"),
                 f"CLIP features ({ms_mode})")


@pytest.mark.parametrize("weight_dtype", ["float32", "float16", "bfloat16"])
def test_fp16_compute(ms_mode, pairs, weight_dtype):
    """fp16 activations (LayerNorm and softmax in fp32) against the fp32 torch reference; own tolerance row."""
    pair = pairs[weight_dtype]
    h, w, b = CASES[0]
    out = pair.tower(ms.Tensor(_pixels(h, w, b)).astype(ms.float16), None)
    assert out.dtype == ms.float16
    assert_close(out, pair.reference(h, w, b)[-1][:, 1:], (weight_dtype, "float16"),
                 f"CLIP features ({ms_mode})")


def test_size_mismatch_without_pos_resize_raises(ms_mode, fp32_pair):
    with pytest.raises(ValueError, match="pass pos_resize"):
        fp32_pair.tower(ms.Tensor(_pixels(364, 364, 1)), None)


# ---- official golden output ------------------------------------------------------------------------------
def test_golden_ixc25_checkpoint(ms_mode):
    """The real bf16 tiny IXC-2.5 checkpoint through our tower matches the official PyTorch ViT output.

    `vit_out_wide_hd1` holds the 2x2-merged features (20x20x512) of the 560 global view and of the single
    tile, each grid row followed by a `sub_GN` separator (global rows, `glb_GN`, tile rows); for hd1 both
    views are this same image. The merge (concatenating each 2x2 block row-major) is done here to compare.
    """
    tower = VisionTower(infer_vision_config(_checkpoint_vit_shapes()), ms.bfloat16, post_layernorm=True)
    paths = _checkpoint_vit_map()
    for name, p in tower.parameters_and_names():
        key = "vit." + name
        with safe_open(paths[key], "pt") as fh:
            value = fh.get_tensor(key)
        assert value.dtype == torch.bfloat16
        p.set_data(ms.Tensor(value.float().numpy()).astype(ms.bfloat16))
    golden = np.load(os.path.join(GOLDEN_DIR, "golden.npz"))
    pixels = golden["pixels_wide_hd1"]
    features = tower(ms.Tensor(pixels), tower.pos_resize(*pixels.shape[2:])).asnumpy()
    grid, width = 40, 128
    assert features.shape == (1, grid * grid, width)
    merged = (features[0].reshape(grid // 2, 2, grid // 2, 2, width).transpose(0, 2, 1, 3, 4)
              .reshape(grid // 2, grid // 2, 4 * width))
    rows = golden["vit_out_wide_hd1"][0]
    global_view = rows[:420].reshape(20, 21, 4 * width)[:, :20]
    tile = rows[421:].reshape(20, 21, 4 * width)[:, :20]
    assert_close(merged, global_view, ("bfloat16", "float32"), f"golden global view ({ms_mode})")
    assert_close(merged, tile, ("bfloat16", "float32"), f"golden tile ({ms_mode})")
