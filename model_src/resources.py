"""The data shipped inside the package: the trained tiny checkpoint and the demo's sample images.

Read through :mod:`importlib.resources`, so they are found wherever the package is installed
(a clone, an editable install or a wheel). torch-free.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from maven_edge.core.errors import CheckpointError


def _package_dir(*parts: str) -> Path:
    root = resources.files(__package__)
    path = Path(str(root.joinpath(*parts)))
    if not path.is_dir():
        raise CheckpointError(
            f"the packaged data folder {'/'.join(parts)} is missing from {root}; reinstall maven-edge "
            "(the shipped checkpoint and samples are package data of maven_edge.model_src)"
        )
    return path


def shipped_checkpoint(name: str = "tiny") -> Path:
    """The checkpoint shipped with the package (``model_src/checkpoints/<name>``)."""
    return _package_dir("checkpoints", name)


def samples_dir() -> Path:
    """The demo's sample images and its question (``model_src/samples``)."""
    return _package_dir("samples")
