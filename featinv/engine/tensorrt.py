"""The TensorRT backend: an engine built from the ONNX denoiser (fp16, optimisation profiles over the
batch), kept in a cache keyed by everything that makes an engine valid, and run on torch tensors.

Cache layout: ``<root>/<key>.plan`` and ``<root>/<key>.json`` (the manifest: the key's fields, the
engine's sha256, when and how it was built). Both are written atomically, the manifest last; an
engine whose manifest or hash does not match, or that TensorRT fails to deserialize, is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from featinv.engine.export import DENOISER_FILE
from featinv.errors import FeatInvError
from featinv.files import write_bytes_atomic
from featinv.weights import file_sha256

INSTALL_HINT = "pip install tensorrt (needs an NVIDIA GPU with CUDA 12 or newer)"
PRECISIONS = ("fp16", "fp32")


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, or one clear error saying how to install it."""
    try:
        import tensorrt
    except ImportError as error:
        raise FeatInvError(f"the tensorrt backend needs TensorRT, which is not installed: {INSTALL_HINT}") from error
    if not torch.cuda.is_available():
        raise FeatInvError("the tensorrt backend needs a CUDA GPU, and torch sees none")
    return tensorrt


@dataclass(frozen=True)
class EngineKey:
    """What an engine depends on. ``profiles``: (min, opt, max) denoiser batch sizes, one per profile."""

    onnx_sha256: str
    tensorrt_version: str
    compute_capability: str
    precision: str
    profiles: tuple[tuple[int, int, int], ...]

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise FeatInvError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for profile in self.profiles:
            if len(profile) != 3 or not 1 <= profile[0] <= profile[1] <= profile[2]:
                raise FeatInvError(
                    f"each profile must be (min, opt, max) batch sizes with 1 <= min <= opt <= max, got {profile}"
                )

    def digest(self) -> str:
        fields = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(fields.encode()).hexdigest()[:32]


class EngineCache:
    """Engines by key under ``root``; ``load_or_build`` reuses a valid one and rebuilds otherwise."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def paths(self, key: EngineKey) -> tuple[Path, Path]:
        stem = self.root / key.digest()
        return stem.with_suffix(".plan"), stem.with_suffix(".json")

    def _valid(self, key: EngineKey) -> bytes | None:
        plan, manifest_path = self.paths(key)
        try:
            manifest = json.loads(manifest_path.read_text())
            data = plan.read_bytes()
        except (OSError, ValueError):
            return None
        if manifest.get("key") != json.loads(json.dumps(asdict(key))):
            return None
        if manifest.get("engine_sha256") != hashlib.sha256(data).hexdigest():
            return None
        return data

    def store(self, key: EngineKey, data: bytes, build_seconds: float) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        plan, manifest_path = self.paths(key)
        manifest_path.unlink(missing_ok=True)  # an engine without its manifest is never used
        write_bytes_atomic(plan, data)
        manifest = {
            "key": asdict(key),
            "engine_sha256": hashlib.sha256(data).hexdigest(),
            "engine_bytes": len(data),
            "build_seconds": round(build_seconds, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_bytes_atomic(manifest_path, json.dumps(manifest, indent=2).encode())

    def load_or_build(self, key: EngineKey, build: Callable[[], bytes], load: Callable[[bytes], Any]) -> Any:
        """``load`` the cached engine; if there is none, it is invalid or ``load`` fails, ``build``
        a new one, store it, and load that."""
        data = self._valid(key)
        if data is not None:
            try:
                return load(data)
            except Exception as error:  # a TensorRT engine that no longer deserializes: rebuild it
                print(f"featinv: cached TensorRT engine {self.paths(key)[0]} failed to load ({error}); rebuilding")
        start = time.perf_counter()
        data = build()
        self.store(key, data, time.perf_counter() - start)
        return load(data)


def engine_key(onnx_folder: str | Path, precision: str, profiles: tuple[tuple[int, int, int], ...]) -> EngineKey:
    """The key of an engine for the export in ``onnx_folder`` on this GPU and TensorRT."""
    tensorrt = require_tensorrt()
    major, minor = torch.cuda.get_device_capability()
    return EngineKey(
        onnx_sha256=file_sha256(Path(onnx_folder) / DENOISER_FILE),
        tensorrt_version=tensorrt.__version__,
        compute_capability=f"{major}.{minor}",
        precision=precision,
        profiles=tuple(tuple(p) for p in profiles),
    )


def build_engine(onnx_folder: str | Path, key: EngineKey, shapes: dict[str, tuple[int, ...]]) -> bytes:
    """Build a serialized engine. ``shapes``: each input's shape without the batch dimension."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(Path(onnx_folder) / DENOISER_FILE)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FeatInvError(f"TensorRT cannot parse the ONNX denoiser: {errors}")
    config = builder.create_builder_config()
    if key.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    for low, opt, high in key.profiles:
        profile = builder.create_optimization_profile()
        for name, shape in shapes.items():
            profile.set_shape(name, (low, *shape), (opt, *shape), (high, *shape))
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FeatInvError("TensorRT failed to build the engine (see its log above)")
    return bytes(serialized)


def within_rows(run, low: int, high: int, *tensors: torch.Tensor) -> torch.Tensor:
    """``run(*tensors)`` for any number of rows, each call within an engine profile's [low, high]
    rows: more than ``high`` are run in chunks, fewer than ``low`` padded with copies of the last
    row (dropped from the result). Rows are independent, so the result is the same."""
    rows = len(tensors[0])
    if rows > high:
        return torch.cat(
            [within_rows(run, low, high, *(t[i : i + high] for t in tensors)) for i in range(0, rows, high)]
        )
    if rows < low:
        padded = [torch.cat([t, t[-1:].expand(low - rows, *t.shape[1:])]) for t in tensors]
        return run(*padded)[:rows]
    return run(*tensors)


class TensorRTDenoiser:
    """A :class:`featinv.engine.base.Denoiser` running a TensorRT engine on the current CUDA stream.

    ``rows``: the (min, max) denoiser batch of the engine's profile; other batches are chunked or
    padded into it (:func:`within_rows`)."""

    def __init__(self, engine: Any, rows: tuple[int, int] = (1, 2**31)) -> None:
        trt = require_tensorrt()
        self.engine = engine
        self.context = engine.create_execution_context()
        self.trt = trt
        self.rows = rows

    @classmethod
    def from_export(
        cls,
        onnx_folder: str | Path,
        cache_dir: str | Path,
        shapes: dict[str, tuple[int, ...]],
        *,
        precision: str = "fp16",
        profiles: tuple[tuple[int, int, int], ...] = ((2, 2, 32),),
    ) -> TensorRTDenoiser:
        trt = require_tensorrt()
        key = engine_key(onnx_folder, precision, profiles)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))

        def load(data: bytes) -> Any:
            engine = runtime.deserialize_cuda_engine(data)
            if engine is None:
                raise RuntimeError("deserialize_cuda_engine returned None")
            return engine

        engine = EngineCache(cache_dir).load_or_build(key, lambda: build_engine(onnx_folder, key, shapes), load)
        # the engine uses its first profile (execution contexts start there)
        return cls(engine, rows=(profiles[0][0], profiles[0][2]))

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timestep: int, hint: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """eps (B, C, H, W) for any B: run in chunks or padded into the engine's profile."""

        def run(sample, hint, context):
            return self._run(sample, timestep, hint, context)

        return within_rows(run, *self.rows, sample, hint, context)

    def _run(self, sample: torch.Tensor, timestep: int, hint: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch = sample.shape[0]
        dtype = torch.float32
        inputs = {
            "sample": sample.to(dtype).contiguous(),
            "timestep": torch.full((batch,), int(timestep), dtype=torch.int64, device=sample.device),
            "context": context.to(dtype).contiguous(),
            "hint": hint.to(dtype).contiguous(),
        }
        for name, tensor in inputs.items():
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                low, high = self.rows
                raise FeatInvError(
                    f"the TensorRT engine does not take {name} of shape {tuple(tensor.shape)} "
                    f"(its profile: {low} to {high} rows of the shapes it was exported with)"
                )
            self.context.set_tensor_address(name, tensor.data_ptr())
        eps = torch.empty_like(inputs["sample"])
        self.context.set_tensor_address("eps", eps.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise FeatInvError("TensorRT failed to run the denoiser engine")
        return eps
