"""Independent PyTorch reference of the XComposer2 family (IXC2-VL, IXC2-4KHD, IXC-2.5).

The second judge of the MindSpore port: written from REFERENCE.md, imports nothing of the MindSpore code (only
`ms_xcomposer.config`), uses transformers' CLIPVisionModel for the tower and transformers' `generate` for
decoding. Needs the optional dependencies torch and transformers (`pip install ms-xcomposer[parity]`); nothing
else in the package imports this subpackage.
"""
try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ms_xcomposer.reference needs torch and transformers: pip install 'ms-xcomposer[parity]'"
    ) from e

from ms_xcomposer.reference.checkpoint import iter_shards, read_config, shard_files, tensor_shapes
from ms_xcomposer.models.xcomposer2.config import INFER_MODES
from ms_xcomposer.reference.internlm2 import RotaryEmbedding, ntk_scaled_base
from ms_xcomposer.reference.model import ReferenceConfig, ReferenceXComposer2
from ms_xcomposer.reference.vision import assemble_hd, merge_2x2, split_views

__all__ = [
    "ReferenceConfig", "ReferenceXComposer2", "RotaryEmbedding", "INFER_MODES", "assemble_hd", "iter_shards",
    "merge_2x2", "ntk_scaled_base", "read_config", "shard_files", "split_views", "tensor_shapes",
]
