"""Denoiser backends behind one interface (``Denoiser``): ``eager`` is the reference; ``compiled``
runs it through torch.compile; ``onnx`` runs the exported graph in onnxruntime; ``tensorrt``
builds (and caches) a TensorRT engine from it. ``fast`` (CUDA only) replaces the whole guided
sampler loop (``featinv.engine.fast``); its per-step denoiser, used where that loop does not apply
(no guidance, DDIM with eta > 0), is the eager one."""

from __future__ import annotations

from pathlib import Path

from featinv.choices import BACKENDS  # the one list of names, read by the CLI too
from featinv.engine.base import Denoiser
from featinv.engine.eager import EagerDenoiser
from featinv.errors import FeatInvError


def make_denoiser(model, backend: str = "eager", *, engine_dir: str | Path | None = None) -> Denoiser:
    """The denoiser of ``model`` on the named backend. ``engine_dir``: where the ONNX export (and
    the TensorRT engine cache) live; default ``~/.cache/featinv/onnx/<weights fingerprint>``."""
    if backend == "eager":
        return EagerDenoiser(model)
    if backend == "fast":
        from featinv.engine.fast import require_cuda

        require_cuda(model.context.device)
        return EagerDenoiser(model)
    if backend == "compiled":
        from featinv.engine.compiled import CompiledDenoiser

        return CompiledDenoiser(model)
    if backend == "onnx":
        from featinv.engine.onnx import OnnxDenoiser, ensure_export

        return OnnxDenoiser(ensure_export(model, engine_dir))
    if backend == "tensorrt":
        from featinv.engine.onnx import ensure_export
        from featinv.engine.tensorrt import TensorRTDenoiser, require_tensorrt

        require_tensorrt()  # fail before exporting anything
        folder = ensure_export(model, engine_dir)
        from featinv.engine.export import read_manifest

        manifest = read_manifest(folder)
        shapes = {
            "sample": tuple(manifest["latent_shape"]),
            "timestep": (),
            "context": tuple(manifest["context_shape"]),
            "hint": tuple(manifest["hint_shape"]),
        }
        return TensorRTDenoiser.from_export(folder, folder / "tensorrt", shapes)
    raise FeatInvError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


__all__ = ["BACKENDS", "Denoiser", "EagerDenoiser", "make_denoiser"]
