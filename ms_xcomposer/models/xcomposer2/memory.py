"""XComposer2's vision side for the memory estimate (`ms_xcomposer.memory`): images are encoded one after the
other (the largest counts), each as 1 + HD tiles views of the CLIP tower (one view for IXC2-VL), run
`config.VISION_GROUP` views per tower call."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from ms_xcomposer.config import VISION_GROUP
from ms_xcomposer.memory import VisionLoad, VisionMemory, vit_activation
from ms_xcomposer.models.xcomposer2.config import XComposerConfig
from ms_xcomposer.models.xcomposer2.info import variant_name
from ms_xcomposer.models.xcomposer2.prompt import DEFAULT_MAX_LENGTH, effective_hd_num

Grid = Optional[Tuple[int, int]]  # HD tile grid (rows, cols); None for IXC2-VL's single view


def image_rows(config: XComposerConfig, grid: Grid) -> int:
    """Prompt rows of one image: its HD tile grid, or None for IXC2-VL's single view."""
    return config.image_tokens(*grid) if grid is not None else config.image_tokens()


def grid_load(config: XComposerConfig, grids: Sequence[Grid], c: int) -> VisionLoad:
    """The images of these HD grids: their rows together, the largest one's vision peak."""
    vit = config.vision
    activation = max((vit_activation(1 + (g[0] * g[1] if g is not None else 0), vit.num_attention_heads,
                                     vit.num_positions, vit.intermediate_size, vit.hidden_size, c, group=VISION_GROUP)
                      for g in grids),
                     default=0)
    return VisionLoad(sum(image_rows(config, g) for g in grids), activation)


def worst(config: XComposerConfig, n_images: int, hd_num: Optional[int], c: int) -> VisionLoad:
    """n images at the HD grid with the most rows that hd_num tiles allow (a hd_num x 1 strip)."""
    hd = effective_hd_num(config.spec, max(n_images, 1), hd_num)
    grid = (hd, 1) if config.spec.hd_tiles else None
    load = grid_load(config, [grid] * n_images, c)
    layout = f"hd_num {hd}, {grid[0]}x{grid[1]} tiles" if grid else "one view"
    return VisionLoad(load.rows, load.activation, layout, hd)


VISION_MEMORY = VisionMemory(option="hd_num", worst=worst, title=variant_name,
                             prompt_limit=lambda config: DEFAULT_MAX_LENGTH[config.variant])
