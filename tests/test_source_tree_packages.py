"""Every folder of the package with Python modules is a regular package (has ``__init__.py``): the
wheel's ``find_packages`` skips any other, as it once skipped ``featinv/training``."""

from __future__ import annotations

from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]


def test_every_module_folder_is_in_the_wheels_packages():
    found = set(find_packages(where=str(ROOT), include=["featinv", "featinv.*"]))
    folders = {p.parent for p in (ROOT / "featinv").rglob("*.py")}
    wanted = {".".join(folder.relative_to(ROOT).parts) for folder in folders}
    assert wanted <= found, sorted(wanted - found)
