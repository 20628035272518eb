"""Vision side of the reference: the CLIP tower (transformers' own CLIPVisionModel) and the HD token layout.

Parameter names: `vit.vision_tower.vision_model.*` once `VisionTower` sits at `vit` in the full model.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from ms_xcomposer.config import VisionConfig


def clip_vision_config(vision: VisionConfig) -> CLIPVisionConfig:
    """The transformers config of the tower described by `vision` (eager attention: a plain, exact judge)."""
    return CLIPVisionConfig(
        hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.num_hidden_layers, num_attention_heads=vision.num_attention_heads,
        image_size=vision.image_size, patch_size=vision.patch_size, num_channels=3,
        hidden_act=vision.hidden_act, layer_norm_eps=vision.layer_norm_eps, attn_implementation="eager",
    )


class VisionTower(nn.Module):
    """CLIP ViT returning the last encoder layer's patch tokens (CLS dropped, no post-LN)."""

    def __init__(self, vision: VisionConfig, has_post_layernorm: bool = True) -> None:
        super().__init__()
        self.image_size = vision.image_size
        self.vision_tower = CLIPVisionModel(clip_vision_config(vision))
        if not has_post_layernorm:
            # 4KHD checkpoints have no post_layernorm; the features never use it.
            self.vision_tower.vision_model.post_layernorm = nn.Identity()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [T, 3, H, W] (normalised) -> [T, (H/patch) * (W/patch), width].

        An input size other than the stored grid uses a bicubic resize of the position grid
        (transformers' `interpolate_pos_encoding`).
        """
        other_size = tuple(pixels.shape[-2:]) != (self.image_size, self.image_size)
        out = self.vision_tower(pixel_values=pixels, output_hidden_states=True,
                                interpolate_pos_encoding=other_size)
        return out.hidden_states[-1][:, 1:]


def split_views(pixels: torch.Tensor, tile: int) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
    """One HD image [1, 3, h*tile, w*tile] -> (global view [1, 3, tile, tile], tiles [h*w, 3, tile, tile], h, w).

    The global view is the normalised image bicubic-interpolated (align_corners=False) to one tile; tiles are
    row-major.
    """
    if pixels.dim() != 4 or pixels.shape[0] != 1 or pixels.shape[1] != 3:
        raise ValueError(f"expected one image [1, 3, H, W], got shape {tuple(pixels.shape)}")
    _, _, height, width = pixels.shape
    if height % tile or width % tile:
        raise ValueError(f"HD image size {height}x{width} is not a multiple of the tile size {tile}")
    h, w = height // tile, width // tile
    glb = F.interpolate(pixels, size=(tile, tile), mode="bicubic", align_corners=False)
    tiles = pixels.reshape(3, h, tile, w, tile).permute(1, 3, 0, 2, 4).reshape(h * w, 3, tile, tile)
    return glb, tiles, h, w


def merge_2x2(features: torch.Tensor) -> torch.Tensor:
    """ViT tokens [T, g*g, C] -> [T, g/2, g/2, 4C]; the 4C channels are ordered (row offset, column offset, C)."""
    t, n, c = features.shape
    g = int(round(n ** 0.5))
    if g * g != n or g % 2:
        raise ValueError(f"cannot 2x2-merge {n} tokens: not an even square grid")
    x = features.reshape(t, g // 2, 2, g // 2, 2, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(t, g // 2, g // 2, 4 * c)


def assemble_hd(glb: torch.Tensor, tiles: torch.Tensor, h: int, w: int,
                glb_gn: torch.Tensor, sub_gn: torch.Tensor) -> torch.Tensor:
    """Token layout of one HD image, before the projector.

    glb [1, m, m, D], tiles [h*w, m, m, D] (row-major), glb_gn [1, 1, D], sub_gn [1, 1, 1, D] ->
    [1, (h*w + 1)*m*m + 1 + (h + 1)*m, D]: the global grid rows each followed by sub_gn, then glb_gn, then the
    (h*m) x (w*m) mosaic of tiles with sub_gn after each of its rows.
    """
    _, m, _, d = glb.shape
    glb_rows = torch.cat([glb, sub_gn.expand(1, m, 1, d)], dim=2).reshape(1, -1, d)
    mosaic = tiles.reshape(h, w, m, m, d).permute(0, 2, 1, 3, 4).reshape(1, h * m, w * m, d)
    mosaic = torch.cat([mosaic, sub_gn.expand(1, h * m, 1, d)], dim=2).reshape(1, -1, d)
    return torch.cat([glb_rows, glb_gn.reshape(1, 1, d), mosaic], dim=1)
