"""LLaVA's vision side for the memory estimate (`ms_xcomposer.memory`): a turn's images go through the CLIP
tower together, one view of `image_size` px each, and each fills `image_tokens` prompt rows (576 at 336 px)."""
from __future__ import annotations

from typing import Optional

from ms_xcomposer.memory import VisionLoad, VisionMemory, vit_activation


def worst(config, n_images: int, option: Optional[int], c: int) -> VisionLoad:
    """n images (their size does not matter: each is resized to one view)."""
    vit = config.vision
    activation = vit_activation(n_images, vit.num_attention_heads, vit.num_positions, vit.intermediate_size,
                                vit.hidden_size, c) if n_images else 0
    return VisionLoad(n_images * config.image_tokens, activation, f"one {vit.image_size}-px view")


VISION_MEMORY = VisionMemory(option=None, worst=worst, title=lambda config: "LLaVA-1.5")
