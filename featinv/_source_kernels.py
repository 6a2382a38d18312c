"""``featinv.kernels`` is the top-level ``kernels/`` folder (the repository's layout): ``setup.py``
maps it on installation. A source tree used without installing (``PYTHONPATH=.``) has no such
mapping, so this finder supplies it there; an installed mapping always wins."""

from __future__ import annotations

import importlib.abc
import importlib.util
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
