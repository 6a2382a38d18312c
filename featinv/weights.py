"""Safe reading and atomic writing of weights: safetensors, or ``torch.load(weights_only=True)``.

Weights are written one tensor at a time (:func:`write_safetensors`), cast to the stored dtype on
the way, so that saving a model never makes a second copy of it: safetensors' ``save_file`` needs
every tensor in its final dtype at once, which for a model held in float16 and saved as float32
(the published checkpoint's conversion) is a whole extra float32 model in memory.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from featinv.errors import FeatInvError
from featinv.files import atomic_file, require_file

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
# safetensors' names of the dtypes featinv writes
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def load_state_dict(path: str | Path, *, what: str = "weights", mmap: bool = False) -> dict[str, torch.Tensor]:
    """Load a state dict from a safetensors file or a ``.pth``/``.pt`` file, never unpickling code.

    ``mmap``: a ``.pt``/``.ckpt`` file in torch's zip format is memory-mapped (its tensors are read
    from disk when used, not copied into memory first); a file of the legacy format is read whole.

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
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as error:  # mmap needs the zip format: read a legacy file whole
            if not mmap or "zipfile" not in str(error):
                raise
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
    state: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write a safetensors file atomically (a temporary file in the same folder, then a rename),
    one tensor at a time; ``dtype``: the floating-point tensors are stored in it (default: as they are)."""
    path = Path(path)
    if path.is_dir():
        raise FeatInvError(f"cannot write the safetensors file {path}: it is a folder (give a file path)")
    with atomic_file(path) as temp:
        write_safetensors(state, temp, metadata=metadata, dtype=dtype)


def stored_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype ``tensor`` is written in: ``dtype`` for a floating-point tensor, else its own."""
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def write_safetensors(
    state: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """The safetensors format (an 8-byte little-endian header length, a JSON header of dtypes,
    shapes and byte ranges padded to 8 bytes, then the tensors' bytes in that order), written
    tensor by tensor: at most one tensor is converted and held at a time. The same ``state``
    gives the same bytes."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in state.items():
        kind = stored_dtype(tensor, dtype)
        if kind not in SAFETENSORS_DTYPES:
            raise FeatInvError(f"cannot write tensor {name!r}: dtype {kind} is not one featinv stores")
        size = tensor.numel() * kind.itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[kind],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with Path(path).open("wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for tensor in state.values():
            stored = tensor.detach().to("cpu", stored_dtype(tensor, dtype)).contiguous()
            handle.write(stored.reshape(-1).view(torch.uint8).numpy().data)


def read_safetensors_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """(the JSON header of a safetensors file, where its data starts); FeatInvError when it is not one."""
    path = Path(path)
    with path.open("rb") as handle:
        try:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > min(path.stat().st_size, 100 * 2**20):
                raise ValueError(f"a header of {length} bytes")
            header = json.loads(handle.read(length))
        except (struct.error, ValueError) as error:
            raise FeatInvError(f"{path} is not a safetensors file ({error})") from error
    if not isinstance(header, dict):
        raise FeatInvError(f"{path} is not a safetensors file (its header is not an object)")
    header.pop("__metadata__", None)
    return header, 8 + length


def iter_safetensors(path: str | Path, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors ``names`` of a safetensors file, read one at a time with plain reads (no mapping
    of the whole file, so only the tensor in hand is in memory)."""
    header, start = read_safetensors_header(path)
    dtypes = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
    with Path(path).open("rb") as handle:
        for name in names:
            entry = header[name]
            begin, end = entry["data_offsets"]
            handle.seek(start + begin)
            data = bytearray(handle.read(end - begin))
            if len(data) != end - begin:
                raise FeatInvError(f"{path} is truncated: tensor {name!r} ends past the file")
            tensor = (
                torch.frombuffer(data, dtype=dtypes[entry["dtype"]])
                if data
                else torch.empty(0, dtype=dtypes[entry["dtype"]])
            )
            yield name, tensor.reshape(entry["shape"])


def save_diffusers_model(module: Any, folder: str | Path, *, dtype: torch.dtype | None = None) -> None:
    """A diffusers model's folder as its ``save_pretrained`` writes it (``config.json`` and
    ``diffusion_pytorch_model.safetensors``), its weights written by :func:`write_safetensors`
    (``dtype``: stored in it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    module.save_config(folder)
    write_safetensors(module.state_dict(), folder / DIFFUSERS_WEIGHTS, metadata={"format": "pt"}, dtype=dtype)


def file_sha256(path: str | Path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def update_digest(
    digest: Any,
    prefix: str,
    state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    *,
    stored_as: torch.dtype | None = None,
) -> None:
    """Feed ``prefix.name:shape:dtype`` and the bytes of each tensor (in logical order whatever the
    layout: a channels-last (C, K, 1, 1) weight counts as contiguous yet has a last-dim stride > 1,
    which a byte view refuses) into ``digest`` (a hashlib object): the weights' fingerprints.
    ``stored_as``: each floating-point tensor as it reads back once stored in that dtype and loaded
    as float32 (as diffusers loads a float16 file), so a fingerprint taken before writing is the one
    found after loading."""
    for name, tensor in state.items() if isinstance(state, Mapping) else state:
        tensor = tensor.detach().cpu()
        if stored_as is not None and tensor.is_floating_point():
            tensor = tensor.to(stored_as).float()
        digest.update(f"{prefix}.{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.flatten().contiguous().view(torch.uint8).numpy())
