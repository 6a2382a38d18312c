"""The ONNX Runtime backend: the exported denoiser graph run by onnxruntime, with whatever
execution providers the user's onnxruntime has (CPU everywhere; CUDA/TensorRT where installed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from featinv.engine.export import DENOISER_FILE, export_onnx, model_fingerprint, read_manifest
from featinv.errors import FeatInvError
from featinv.models.featinv_model import FeatInvModel


def default_engine_dir(fingerprint: str) -> Path:
    """``$FEATINV_CACHE`` (default ``~/.cache/featinv``) / onnx / <weights fingerprint>."""
    root = Path(os.environ.get("FEATINV_CACHE", Path.home() / ".cache" / "featinv"))
    return root / "onnx" / fingerprint[:20]


def ensure_export(model: FeatInvModel, engine_dir: str | Path | None = None) -> Path:
    """A folder holding this model's ONNX export: reused when its fingerprint matches, else exported.
    The fingerprint hashes every weight, so it is computed once here."""
    fingerprint = model_fingerprint(model)
    folder = Path(engine_dir) if engine_dir is not None else default_engine_dir(fingerprint)
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("model_fingerprint") != fingerprint:
        export_onnx(model, folder, fingerprint=fingerprint)
    return folder


class OnnxDenoiser:
    """A :class:`featinv.engine.base.Denoiser` running ``denoiser.onnx`` in onnxruntime.

    Args:
        folder: an export folder (``featinv export --format onnx``).
        providers: onnxruntime execution providers; default: all available, best first.
    """

    def __init__(self, folder: str | Path, providers: list[str] | None = None) -> None:
        try:
            import onnxruntime
        except ImportError as error:
            raise FeatInvError("the onnx backend needs onnxruntime: pip install 'featinv[onnx]'") from error
        path = Path(folder) / DENOISER_FILE
        if not path.is_file():
            raise FeatInvError(f"no {DENOISER_FILE} in {folder}: export it with 'featinv export --format onnx'")
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(
            str(path), options, providers=providers or onnxruntime.get_available_providers()
        )
        self.dtype = np.float16 if "float16" in self.session.get_inputs()[0].type else np.float32

    def __call__(self, sample: torch.Tensor, timestep: int, hint: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch = sample.shape[0]
        feeds = {
            "sample": sample.detach().cpu().numpy().astype(self.dtype),
            "timestep": np.full((batch,), int(timestep), dtype=np.int64),
            "context": context.detach().cpu().numpy().astype(self.dtype),
            "hint": hint.detach().cpu().numpy().astype(self.dtype),
        }
        (eps,) = self.session.run(["eps"], feeds)
        return torch.from_numpy(eps.astype(np.float32)).to(sample.device)
