"""Training checkpoints that a crash cannot corrupt.

A checkpoint is a folder ``<root>/step-0000500/`` holding safetensors files (weights, optimizer
state, EMA) and ``manifest.json`` (the step, JSON-able trainer state and each file's sha256). It is
written into a temporary folder beside it and renamed into place, so a folder with the final name
is always complete; loading verifies every hash and falls back to the previous checkpoint when one
does not verify. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from featinv.weights import file_sha256

PREFIX = "step-"
MANIFEST = "manifest.json"


@dataclass
class Checkpoint:
    """What a checkpoint holds: ``tensors[group][key]`` and the JSON-able ``state``."""

    step: int
    tensors: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def save_checkpoint(root: str | Path, checkpoint: Checkpoint, *, keep: int = 2) -> Path:
    """Write ``checkpoint`` atomically under ``root``; keep the newest ``keep`` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{checkpoint.step:07d}"
    temp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=root))
    try:
        hashes = {}
        for group, tensors in checkpoint.tensors.items():
            path = temp / f"{group}.safetensors"
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
            hashes[path.name] = file_sha256(path)
        manifest = {"step": checkpoint.step, "state": checkpoint.state, "sha256": hashes}
        (temp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for path in temp.iterdir():  # on disk before the rename makes the checkpoint visible
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders under ``root``, oldest first (partial folders are never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load one checkpoint folder, verifying every file's sha256.

    Raises:
        ValueError: the manifest is missing or unreadable, or a file is missing or altered.
    """
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        hashes = manifest["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"checkpoint {path} has no readable {MANIFEST} ({error})") from error
    tensors = {}
    for name, expected in hashes.items():
        file = path / name
        if not file.is_file() or file_sha256(file) != expected:
            raise ValueError(f"checkpoint {path}: {name} is missing or does not match its sha256")
        tensors[name.removesuffix(".safetensors")] = load_file(str(file))
    return Checkpoint(int(manifest["step"]), tensors, manifest.get("state", {}), path)


def load_latest_checkpoint(root: str | Path) -> Checkpoint | None:
    """The newest checkpoint under ``root`` that verifies; a damaged one is skipped with a warning."""
    for path in reversed(list_checkpoints(root)):
        try:
            return load_checkpoint(path)
        except ValueError as error:
            warnings.warn(f"skipping damaged checkpoint: {error}", stacklevel=2)
    return None


def optimizer_to_checkpoint(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state as (tensors, JSON-able rest), so it can be stored without pickling."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_checkpoint(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict[str, Any]
) -> None:
    """Restore what :func:`optimizer_to_checkpoint` stored into ``optimizer``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *rest["scalars"].items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in rest["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
