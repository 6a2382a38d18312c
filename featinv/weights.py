"""Safe reading and atomic writing of weights: safetensors, or ``torch.load(weights_only=True)``."""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from featinv.errors import FeatInvError
from featinv.files import atomic_file, require_file


def load_state_dict(path: str | Path, *, what: str = "weights") -> dict[str, torch.Tensor]:
    """Load a state dict from a safetensors file or a ``.pth``/``.pt`` file, never unpickling code.

    Raises:
        FeatInvError: the file is missing, truncated, corrupt or not a state dict.
    """
    path = require_file(path, f"{what} file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise FeatInvError(f"{what} file {path} is not a valid safetensors file ({error})") from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only refused a global: the file would run code
        found = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)", str(error))
        named = f" ({found.group(1)})" if found else ""
        raise FeatInvError(
            f"{what} file {path} is refused: it is a pickle that would import or call code when loaded{named}; "
            "featinv reads only tensors (safetensors, or torch.load(weights_only=True))"
        ) from error
    except Exception as error:  # torch raises many types for truncated or corrupt files
        detail = " ".join(str(error).split())[:200]
        raise FeatInvError(
            f"{what} file {path} could not be read: truncated or corrupt ({type(error).__name__}: {detail})"
        ) from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FeatInvError(f"{what} file {path} does not hold a state dict of tensors")
    return state


def save_state_dict_atomic(
    state: dict[str, torch.Tensor], path: str | Path, *, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    if path.is_dir():
        raise FeatInvError(f"cannot write the safetensors file {path}: it is a folder (give a file path)")
    with atomic_file(path) as temp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(temp), metadata=metadata)


def file_sha256(path: str | Path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def update_digest(digest: Any, prefix: str, state: dict[str, torch.Tensor]) -> None:
    """Feed ``prefix.name:shape:dtype`` and the bytes of each tensor (in logical order whatever the
    layout: a channels-last (C, K, 1, 1) weight counts as contiguous yet has a last-dim stride > 1,
    which a byte view refuses) into ``digest`` (a hashlib object): the weights' fingerprints."""
    for name, tensor in state.items():
        digest.update(f"{prefix}.{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().flatten().contiguous().view(torch.uint8).numpy().tobytes())
