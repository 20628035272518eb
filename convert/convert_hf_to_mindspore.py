#!/usr/bin/env python
"""Convert a Hugging Face XComposer2 checkpoint to a MindSpore checkpoint directory.

The same as `ms-xcomposer convert SRC_HF_DIR DST_DIR [options]` (see `--help`); the work is done by
`ms_xcomposer.conversion.convert.convert`.
"""
import os
import sys

try:
    from ms_xcomposer.cli import main
except ModuleNotFoundError:  # running from a source checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ms_xcomposer.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
