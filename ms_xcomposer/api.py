"""`load`: a checkpoint directory -> (model, processor) of its family, the way every entry point starts."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

from ms_xcomposer import runtime


def load(path: str, dtype: Optional[str] = None, device: Optional[str] = None, mode: Optional[str] = None,
         progress: Optional[Callable[[int, int], None]] = None) -> Tuple[object, object]:
    """Load a converted directory (or an HF directory, read directly) with the model family registered for it.

    Args:
        path: the directory. Its family comes from the converter's record, or from config.json's architectures.
        dtype: compute dtype ("float32", "float16", "bfloat16"); None: the device's default (CPU: float32).
        device: "CPU", "GPU" or "Ascend"; None keeps the current one. Select it before anything else has run
            MindSpore in this process.
        mode: "pynative" or "graph"; None keeps the current mode.
        progress: called as progress(bytes just loaded, total bytes) while the weights load.

    Returns:
        (model, processor): the family's model class (e.g. `XComposer2ForCausalLM`, with `generation_config`
        read from the directory's generation_config.json) and its processor (e.g. `XComposer2Processor`).
    """
    if device is not None or mode is not None:
        runtime.setup(device or runtime.current_device(), mode or ("graph" if runtime.is_graph_mode() else "pynative"))
    from ms_xcomposer.conversion.readers import open_checkpoint

    with open_checkpoint(path) as reader:
        family, config = reader.family, reader.config
    processor = family.processor_class().from_pretrained(path, config)
    model = family.model_class().from_pretrained(path, compute_dtype=dtype, progress=progress)
    return model, processor
