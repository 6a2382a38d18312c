"""``featinv.kernels`` is the top-level ``kernels/`` folder (the repository's layout): ``setup.py``
maps it on installation. A source tree used without installing (``PYTHONPATH=.``) has no such
mapping, so this finder supplies it there; an installed mapping always wins.

The same folder must not pass for Hugging Face's ``kernels`` package (which transformers imports,
and diffusers through it) where the checkout's root is on ``sys.path`` (``python -m`` run there):
a second finder resolves the top-level name ``kernels`` past the checkout."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

NAME = "featinv.kernels"


class SourceKernelsFinder(importlib.abc.MetaPathFinder):
    """Finds ``featinv.kernels`` (only that name; its submodules follow from its path) in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def find_spec(self, name, path=None, target=None):
        if name != NAME:
            return None
        init = self.folder / "__init__.py"
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(self.folder)])


def map_source_kernels() -> None:
    """Register the finder last, when ``featinv.kernels`` is not importable otherwise and the source
    tree's ``kernels/`` is there."""
    folder = Path(__file__).resolve().parents[1] / "kernels"
    if not (folder / "__init__.py").is_file() or any(isinstance(f, SourceKernelsFinder) for f in sys.meta_path):
        return
    if importlib.util.find_spec(NAME) is None:
        sys.meta_path.append(SourceKernelsFinder(folder))


class UnshadowedKernelsFinder(importlib.abc.MetaPathFinder):
    """Finds the top-level ``kernels`` on ``sys.path`` without the checkout ``root`` (whose
    ``kernels/`` is featinv's own); None where there is no other, so nothing changes then."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, name, path=None, target=None):
        if name != "kernels":
            return None
        elsewhere = [entry for entry in sys.path if Path(os.path.abspath(entry or ".")).resolve() != self.root]
        return importlib.machinery.PathFinder.find_spec(name, elsewhere)


def unshadow_hub_kernels() -> None:
    """Register the finder first, once, when featinv runs from a checkout with its ``kernels/``."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "kernels" / "__init__.py").is_file():
        return
    if not any(isinstance(f, UnshadowedKernelsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, UnshadowedKernelsFinder(root))
