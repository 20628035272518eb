"""InternVL's vision side for the memory estimate (`ms_xcomposer.memory`): every tile of a turn's images goes
through InternViT in one call (`InternVLChatModel.extract_feature` on the concatenated pixel_values), and each
tile fills `num_image_token` (256) prompt rows between `<img>` and `</img>`."""
from __future__ import annotations

from typing import Optional

from ms_xcomposer.memory import VisionLoad, VisionMemory, vit_activation
from ms_xcomposer.models.internvl.processing import DEFAULT_MAX_NUM

# float32 [tiles, heads, 1025, 1025] score tensors alive at InternViT's peak. Measured (peak RSS of a chat above
# the RSS before it, tiny golden model, 7 and 13 tiles): 2.5-2.7 in PyNative, 4.5-4.6 in GRAPH; CLIP's 3
# (`memory.VIT_ATTENTION_COPIES`) would under-estimate GRAPH by half, so the estimate takes 4.
INTERNVIT_ATTENTION_COPIES = 4


def tiles_per_image(max_num: int) -> int:
    """The most tiles `load_image(max_num=...)` makes: a max_num grid, plus the thumbnail when it has more than one."""
    return max_num + (1 if max_num > 1 else 0)


def worst(config, n_images: int, max_num: Optional[int], c: int) -> VisionLoad:
    """n images at max_num tiles each (+ thumbnail): rows (tiles x 256 + `<img>`, `</img>`) and the ViT's peak."""
    max_num = DEFAULT_MAX_NUM if max_num is None else max_num
    tiles = tiles_per_image(max_num)
    vit = config.vision
    side = config.image_size // vit.patch_size
    activation = vit_activation(n_images * tiles, vit.num_attention_heads, side * side + 1, vit.intermediate_size,
                                vit.hidden_size, c, INTERNVIT_ATTENTION_COPIES) if n_images else 0
    rows = n_images * (tiles * config.num_image_token + 2)
    layout = f"max_num {max_num}, {tiles} tiles" + (" with the thumbnail" if tiles > max_num else "")
    return VisionLoad(rows, activation, layout, max_num)


VISION_MEMORY = VisionMemory(option="max_num", worst=worst, title=lambda config: "InternVL-1.5")
