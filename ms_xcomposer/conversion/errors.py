"""Exceptions of the checkpoint conversion package (all are `ValueError`s, so the CLI reports them in one line)."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, malformed, truncated or does not match its index/config.

    The message names the file, the key, and what was expected versus found.
    """


class UnsafePickleError(CheckpointError):
    """A pickled `.bin` shard asks for a global outside the small allow-list a tensor state dict needs."""


class DestinationExistsError(CheckpointError):
    """The output directory exists and `overwrite` was not requested."""


class UnsafeDestinationError(CheckpointError):
    """The output directory may not be written: `/`, the home or current directory, or (with `overwrite`) a
    directory this tool did not write."""
