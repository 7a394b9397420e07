"""Where the project's data folders are: `configs/` (recipes, scheduler defaults, model configs) and
`assets/` (the bundled tiny base and ControlNet).

In a source checkout or an editable install they sit beside the packages, under the folder that holds
pyproject.toml. A wheel installs them under `<prefix>/share/adapterkit/` (pyproject's data-files).
"""
from __future__ import annotations

import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1]
SHARE = Path(sys.prefix) / "share" / "adapterkit"


def data_dir(name: str) -> Path:
    """`configs` or `assets`: the source checkout's folder if this is one, else the installed copy.
    When neither exists the source path is returned, so an error names where the file was expected."""
    source = SOURCE / name
    if (SOURCE / "pyproject.toml").is_file() or not (SHARE / name).is_dir():
        return source
    return SHARE / name
