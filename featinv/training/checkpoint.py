"""Training checkpoints that a crash cannot corrupt.

A checkpoint is a folder ``<root>/step-0000500/`` holding safetensors files (weights, optimizer
state, EMA) and ``manifest.json`` (the step, JSON-able trainer state, each file's sha256, and the
sha256 of all of that: the manifest's own digest). It is written into a temporary folder beside it
and renamed into place, so a folder with the final name is always complete; loading verifies the
manifest's digest and every file's hash, and falls back to the previous checkpoint when anything
does not verify or parse (a file edited together with its hash fails the manifest's digest).
Nothing is pickled.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from featinv.files import staged_folder
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
    with staged_folder(final) as temp:  # synced, then renamed: a checkpoint is whole or absent
        hashes = {}
        for group, tensors in checkpoint.tensors.items():
            path = temp / f"{group}.safetensors"
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
            hashes[path.name] = file_sha256(path)
        manifest = {"step": checkpoint.step, "state": checkpoint.state, "sha256": hashes}
        manifest["digest"] = manifest_digest(manifest)
        (temp / MANIFEST).write_text(json.dumps(manifest, indent=1))
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


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest's step, state and file hashes (canonical JSON): the manifest's own check."""
    import hashlib

    covered = {key: manifest[key] for key in ("step", "state", "sha256")}
    return hashlib.sha256(json.dumps(covered, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load one checkpoint folder, verifying the manifest's digest and every file's sha256.

    Raises:
        ValueError: the manifest is missing, unreadable, malformed or altered, or a file is
            missing, altered or unreadable.
    """
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        hashes, step, state = manifest["sha256"], manifest["step"], manifest.get("state", {})
        if manifest.get("digest") != manifest_digest(manifest):
            raise ValueError("its digest does not match its content")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0 or not isinstance(state, dict):
            raise ValueError(f"step must be an integer >= 0 and state an object, got {step!r}")
        if not isinstance(hashes, dict) or not all(isinstance(v, str) for v in hashes.values()):
            raise ValueError("sha256 must map file names to hex digests")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"checkpoint {path} has no valid {MANIFEST} ({error})") from error
    tensors = {}
    for name, expected in hashes.items():
        file = path / name
        if Path(name).name != name or not file.is_file() or file_sha256(file) != expected:
            raise ValueError(f"checkpoint {path}: {name} is missing or does not match its sha256")
        try:
            tensors[name.removesuffix(".safetensors")] = load_file(str(file))
        except Exception as error:  # safetensors raises its own types for a bad file
            raise ValueError(f"checkpoint {path}: {name} cannot be read ({error})") from error
    return Checkpoint(step, tensors, state, path)


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
