"""adapterkit: fine-tune SD-style U-Nets with small adapters.

The import packages live in the checkout's top-level folders and are installed under this one
namespace (pyproject's package-dir), so their names cannot collide with PyPI's `unet`, `adapters` or
`train`, nor with a user's `train.py`:

    adapterkit.unet       unet/      the model: config, presets, layers, weight files
    adapterkit.adapters   adapters/  LoRA (on peft), ControlNet, Control-LoRA and their files
    adapterkit.train      train/     data, base pipelines, training jobs, the tiny world, the CLI

`python -m adapterkit` is the command line (adapterkit.train.cli).
"""
from pathlib import Path

# A source checkout on sys.path without an install (PYTHONPATH=., as on the GPU machine): the
# packages sit beside this folder rather than inside it. Installed, setuptools maps them here.
_root = Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "train" / "__init__.py").is_file():
    __path__.append(str(_root))
