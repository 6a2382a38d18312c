"""featinv: see what an image classifier sees, by inverting its feature maps with a conditional
diffusion model (FeatInv, Neukirch, Vielhaben & Strodthoff, arXiv 2505.21032).

The public names load on first use (PEP 562): ``import featinv`` and ``featinv --help`` import
no torch, timm or diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

from featinv._source_kernels import map_source_kernels, unshadow_hub_kernels
from featinv.errors import FeatInvError

map_source_kernels()
unshadow_hub_kernels()

_LAZY = {
    "FeatureExtractor": "featinv.features",
    "FeatureSpec": "featinv.features",
    "FeatInvModel": "featinv.models",
    "Reconstruction": "featinv.pipeline",
    "Reconstructor": "featinv.pipeline",
}


def _installed_version() -> str:
    """The version pyproject.toml declares, as installed; the source tree's when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("featinv")
    except PackageNotFoundError:
        import re
        from pathlib import Path

        text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
        found = re.search(r'^version = "([^"]+)"', text, re.MULTILINE)
        return found.group(1) if found else "unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value = _installed_version()
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'featinv' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY, "__version__"])


__all__ = ["FeatInvError", "FeatInvModel", "FeatureExtractor", "FeatureSpec", "Reconstruction", "Reconstructor"]
