"""The names of a classifier's classes, kept beside a model: ``classifier.json``'s ``classes``
(what ``featinv train-classifier`` writes beside its weights, and what a model folder holds for the
classifier it inverts). The web app and the analyses read them from here, never from a classifier's
name."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from featinv.errors import FeatInvError
from featinv.files import read_json_object, write_text_atomic

RECORD = "classifier.json"
MAX_CLASSES = 1_000_000  # more names than any head has


def read_class_names(folder: str | Path) -> list[str] | None:
    """The class names recorded in ``folder/classifier.json``, or None when it records none."""
    file = Path(folder) / RECORD
    if not file.is_file():
        return None
    names = read_json_object(file).get("classes")
    if names is None:
        return None
    return check_class_names(names, f"{file}: classes")


def check_class_names(names: object, where: str = "class_names") -> list[str]:
    """``names`` as a list of strings; a FeatInvError naming ``where`` otherwise."""
    if (
        not isinstance(names, Sequence)
        or isinstance(names, str)
        or not 1 <= len(names) <= MAX_CLASSES
        or not all(isinstance(name, str) and name for name in names)
    ):
        raise FeatInvError(f"{where} must be a list of 1 to {MAX_CLASSES} non-empty names, got {names!r:.80}")
    return list(names)


def write_class_names(folder: str | Path, names: Sequence[str]) -> None:
    """Record ``names`` in ``folder/classifier.json`` (atomically)."""
    write_text_atomic(Path(folder) / RECORD, json.dumps({"classes": list(names)}, indent=2) + "\n")


def display_class_names(recorded: list[str] | None, classes: int) -> list[str]:
    """The classes' names to show: those the model records (its ``classifier.json``, one per
    output), ImageNet's (timm's ``ImageNetInfo``) for other 1000-class classifiers, else ``class k``."""
    if recorded is not None and len(recorded) == classes:
        return list(recorded)
    if classes == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(k).split(",")[0] for k in range(classes)]
    return [f"class {k}" for k in range(classes)]
