"""Checkpoint conversion: HF checkpoints of any registered family <-> MindSpore directories, streamed and exact.

- `readers.open_checkpoint(path)`: lazy reader over an HF dir (.bin / safetensors) or a converted dir.
- `keymap`: the machinery of the families' HF <-> MindSpore name tables (`KeyTable`, `Rule`, `plan_hf_to_ms`).
- `convert.convert`, `convert.export_hf`, `convert.verify`: the library behind the CLI commands.
- `synthetic.write_random_hf_checkpoint`: tiny (or benchmark-sized) random checkpoints in the real HF layout.

The converted directory layout is documented in `layout`.
"""
from ms_xcomposer.conversion.errors import (CheckpointError, DestinationExistsError, UnsafeDestinationError,
                                            UnsafePickleError)
from ms_xcomposer.conversion.readers import CheckpointReader, open_checkpoint, to_mindspore_tensor

__all__ = ["CheckpointError", "DestinationExistsError", "UnsafeDestinationError", "UnsafePickleError",
           "CheckpointReader", "open_checkpoint", "to_mindspore_tensor"]
