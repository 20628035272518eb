"""XComposer2ForCausalLM: CLIP tower + projector + PLoRA InternLM2, for IXC2-VL, IXC2-4KHD and IXC-2.5.

Module tree (= HF state-dict keys): `vit.vision_tower.vision_model.*`, `vision_proj.{0,2}`, `model.*`,
`output`, and for the HD variants `plora_glb_GN` [1,1,4C] / `plora_sub_GN` [1,1,1,4C].

The language model runs on the generic engine (`ms_xcomposer.engine.CausalLM`): this family's extras are
`im_mask` (per token: PLoRA applies on image rows) and `infer_mode` (IXC-2.5's task adapters), which become
the engine's per-token mask and the flags (use_plora, infer_mode). Its image path: the ViT over the global view
+ tiles in groups of `vision_group` views (`_ViTGroup`, the view count dynamic), the 2x2 merge and separator
layout (`hd_layout`, eager: data movement only), the projector (`_VisionProject`, the row count dynamic). So
GRAPH mode compiles two vision graphs whatever the tile grids, and the vision tower's activations are those of
one group of views, whatever hd_num.
"""
from __future__ import annotations

from typing import Mapping, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_xcomposer.config import VISION_GROUP
from ms_xcomposer.engine import CausalLM, GraphPiece
from ms_xcomposer.generation import GenerationConfig
from ms_xcomposer.images import global_view, split_tiles, tile_grid
from ms_xcomposer.models.clip import VisionTower
from ms_xcomposer.models.internlm2 import InternLM2Model
from ms_xcomposer.models.layers import Linear, zeros_param
from ms_xcomposer.models.projector import MLPProjector
from ms_xcomposer.models.xcomposer2.config import INFER_MODES, XComposerConfig


class _ViTGroup(GraphPiece):
    """A group of views [n, 3, t, t] -> ViT features [n, g*g, C]. The view count is a dynamic dimension, so one
    graph serves every group of every image (the last group of an image is smaller)."""

    def __init__(self, owner):
        super().__init__(owner)
        t = owner.config.tile_size
        self.set_inputs(Tensor(shape=[None, 3, t, t], dtype=owner.compute_dtype))

    def construct(self, views):
        return self.owner.vit(views)


class _VisionProject(GraphPiece):
    """Image tokens [1, N, proj_in] -> [1, N, hidden]; N dynamic, so one graph serves every tile grid."""

    def __init__(self, owner):
        super().__init__(owner)
        self.set_inputs(Tensor(shape=[1, None, owner.config.proj_in], dtype=owner.compute_dtype))

    def construct(self, tokens):
        return self.owner.vision_proj(tokens)


def hd_layout(feats: Tensor, grid_h: int, grid_w: int, sub_gn: Tensor, glb_gn: Tensor) -> Tensor:
    """ViT features [1 + h*w, g*g, C] of the global view and the tiles -> the HD image tokens [1, N, 4C]: each
    view 2x2-merged to [m, m, 4C] (channels ordered row offset, column offset, C), the global view's rows then
    `glb_gn`, then the tiles as one (h*m) x (w*m) grid; every row of both grids ends with `sub_gn`.

    Only reshapes, transposes and concatenations (exact); run eagerly, so no graph is compiled per grid."""
    n, gg, c = feats.shape
    m, h, w = int(round(gg ** 0.5)) // 2, grid_h, grid_w
    merged = feats.reshape(n, m, 2, m, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, m, m, 4 * c)
    sub_gn, glb_gn = sub_gn.astype(feats.dtype), glb_gn.astype(feats.dtype)
    glb = ops.cat((merged[:1], ops.broadcast_to(sub_gn, (1, m, 1, 4 * c))), 2).reshape(1, -1, 4 * c)
    tiles = merged[1:].reshape(1, h, w, m, m, 4 * c).transpose(0, 1, 3, 2, 4, 5).reshape(1, h * m, w * m, 4 * c)
    tiles = ops.cat((tiles, ops.broadcast_to(sub_gn, (1, h * m, 1, 4 * c))), 2).reshape(1, -1, 4 * c)
    return ops.cat((glb, glb_gn, tiles), 1)


# The official `model.chat`'s own decoding defaults (sampling, top_p 0.8, repetition penalty 1.005); the
# library's `ms_xcomposer.chat` and the CLI use the checkpoint's generation_config.json over GenerationConfig().
OFFICIAL_CHAT_GENERATION = GenerationConfig(max_new_tokens=1024, do_sample=True, top_p=0.8, repetition_penalty=1.005)


class XComposer2ForCausalLM(CausalLM):
    """The XComposer2 vision-language model. Build with `from_pretrained` (or `ms_xcomposer.load`), or from a
    config for tests.

    Args:
        config: the whole-model config.
        dtype: storage dtype of the weights (kept as loaded by default; float32 when built empty).
        compute_dtype: activation dtype; None picks the device default (CPU: float32, Ascend/GPU: bfloat16).
    """

    per_token_extras = ("im_mask",)
    vision_group: int = VISION_GROUP  # views per vision-tower call; an instance may set its own

    def __init__(self, config: XComposerConfig, dtype=ms.float32, compute_dtype=None):
        super().__init__(compute_dtype)
        self.config = config
        self.vit = VisionTower(config.vision, dtype=dtype, post_layernorm=config.has_post_layernorm)
        self.vision_proj = MLPProjector(config.proj_in, config.proj_hidden, config.llm.hidden_size, dtype=dtype)
        self.model = InternLM2Model(config.llm, config.plora, config.task_adapters, config.task_adapter_rank, dtype)
        self.output = Linear(config.llm.hidden_size, config.llm.vocab_size, bias=False, dtype=dtype)
        if config.spec.hd_tiles:
            self.plora_glb_GN = zeros_param((1, 1, config.proj_in), dtype, "plora_glb_GN")
            self.plora_sub_GN = zeros_param((1, 1, 1, config.proj_in), dtype, "plora_sub_GN")

    # ---- the engine's view -----------------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Cell:
        return self.model

    @property
    def lm_head(self) -> nn.Cell:
        return self.output

    @property
    def llm_config(self):
        return self.config.llm

    def step_inputs(self, extras: Mapping[str, object], batch: int, seq: int) -> Tuple[np.ndarray, tuple]:
        """`im_mask` [B, S] (1/True on image tokens; None = none) and `infer_mode` ("base", "web", "write")."""
        unknown = sorted(set(extras) - {"im_mask", "infer_mode"})
        if unknown:
            raise TypeError(f"XComposer2ForCausalLM got unexpected arguments {unknown}; it takes im_mask, infer_mode")
        infer_mode = extras.get("infer_mode") or "base"
        if infer_mode not in INFER_MODES:
            raise ValueError(f"infer_mode {infer_mode!r} unknown; expected one of {sorted(INFER_MODES)}")
        missing = [t for t in INFER_MODES[infer_mode] if t not in self.config.task_adapters]
        if missing:
            raise ValueError(f"infer_mode {infer_mode!r} needs the task adapters lora_{'/'.join(missing)}, "
                             "which this checkpoint does not have (converted with --task-lora drop, or not IXC-2.5)")
        im_mask = extras.get("im_mask")
        mask = np.zeros((batch, seq), np.float32) if im_mask is None else _as_numpy(im_mask).astype(np.float32)
        if mask.shape != (batch, seq):
            raise ValueError(f"im_mask has shape {mask.shape}, expected {(batch, seq)} to match the inputs")
        return mask, (bool(mask.any()), infer_mode)

    # ---- image side ----------------------------------------------------------------------------------
    def vit_views(self, pixels: np.ndarray) -> Tuple[np.ndarray, int, int]:
        """Normalised pixels [1, 3, H, W] -> the ViT batch (global view + tiles for HD variants) and grid."""
        return split_views(pixels, self.config.tile_size, self.config.spec.hd_tiles)

    def encode_img(self, pixels, project: bool = True) -> Tensor:
        """Normalised pixels [1, 3, H, W] (numpy or Tensor; H, W multiples of the tile size for HD variants, as
        `XComposer2Processor.preprocess` makes them) -> [1, N, hidden] embeddings in the compute dtype.
        project=False returns the assembled image tokens before `vision_proj` ([1, N, proj_in]).
        """
        if isinstance(pixels, Tensor):
            pixels = pixels.asnumpy()
        if not isinstance(pixels, np.ndarray) or pixels.dtype.kind != "f":
            raise TypeError("encode_img takes normalised float pixels [1, 3, H, W]; preprocess paths and PIL "
                            "images with the processor (XComposer2Processor.preprocess)")
        views, grid_h, grid_w = self.vit_views(pixels)
        vit = self._piece(("vit",), lambda: _ViTGroup(self))
        size = max(1, int(self.vision_group))
        groups = [vit(Tensor(views[a:a + size]).astype(self.compute_dtype)) for a in range(0, len(views), size)]
        feats = groups[0] if len(groups) == 1 else ops.cat(groups, 0)
        del groups
        if self.config.spec.hd_tiles:
            feats = hd_layout(feats, grid_h, grid_w, self.plora_sub_GN, self.plora_glb_GN)
        if not project:
            return feats
        return self._piece(("vision_proj",), lambda: _VisionProject(self))(feats)

    # ---- chat (the official methods; the work is in the processor and ms_xcomposer.conversation) ---------
    def chat(self, tokenizer, query: str, image=None, history=(), streamer=None, **kwargs):
        """The official `model.chat(tokenizer, query, image, hd_num=..., history=..., do_sample=..., ...)` ->
        (response, history), with the official decoding defaults (`OFFICIAL_CHAT_GENERATION`). `image`: None
        (the text-only path), one image or a list (an empty list is the interleaved path, as officially);
        paths, PIL images or arrays (see `XComposer2Processor`)."""
        from ms_xcomposer.conversation import run_turn

        result = run_turn(self, *self._official_turn(tokenizer, query, image, history, kwargs), streamer)
        return result.response, result.history

    def stream_chat(self, tokenizer, query: str, image=None, history=(), **kwargs):
        """`chat`, streamed: iterate the returned `ChatStream` for the response text as it is produced."""
        from ms_xcomposer.conversation import ChatStream, run_turn

        processor, query, history, turn = self._official_turn(tokenizer, query, image, history, kwargs)
        return ChatStream(lambda streamer: run_turn(self, processor, query, history, turn, streamer), processor)

    def _official_turn(self, tokenizer, query, image, history, kwargs):
        from ms_xcomposer.conversation import prepare_turn
        from ms_xcomposer.models.xcomposer2.processor import XComposer2Processor

        processor = XComposer2Processor(tokenizer, self.config)
        images = None if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        turn = prepare_turn(self, processor, query, images, history, OFFICIAL_CHAT_GENERATION, **kwargs)
        return processor, query, history, turn


def split_views(pixels: np.ndarray, tile: int, hd_tiles: bool) -> Tuple[np.ndarray, int, int]:
    """[1, 3, H, W] -> (views [n, 3, tile, tile], grid_h, grid_w).

    HD variants: the global view (PyTorch-compatible bicubic resize to one tile) followed by the h x w tiles
    in row-major order; otherwise the image itself, which must be tile x tile.
    """
    if pixels.ndim != 4 or pixels.shape[:2] != (1, 3):
        raise ValueError(f"pixels must have shape [1, 3, H, W], got {list(pixels.shape)}")
    pixels = pixels.astype(np.float32)
    if not hd_tiles:
        if pixels.shape[2:] != (tile, tile):
            raise ValueError(f"this variant takes {tile}x{tile} images, got {pixels.shape[2]}x{pixels.shape[3]}")
        return pixels, 1, 1
    grid_h, grid_w = tile_grid(pixels, tile)
    return np.concatenate([global_view(pixels, tile), split_tiles(pixels, tile)]), grid_h, grid_w


def _as_numpy(x) -> np.ndarray:
    return x.asnumpy() if isinstance(x, Tensor) else np.asarray(x)


