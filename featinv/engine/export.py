"""ONNX export of the FeatInv denoiser (ControlNet + UNet + the residual injection, one graph) and
of the hint encoder on its own.

Graph inputs, all with a dynamic batch dimension ``batch``:

* ``denoiser.onnx``: ``sample`` (B, C, H, W) float, ``timestep`` (B,) int64, ``context`` (B, L, D)
  float, ``hint`` (B, C0, H, W) float -> ``eps`` (B, C, H, W). The hint embedding and the contexts
  are inputs, not baked in: the caller runs the hint encoder once per sample and batches both
  classifier-free-guidance branches (zero features + null context, features + context) as 2B.
* ``hint_encoder.onnx``: ``features`` (B, C, h, w) -> ``hint`` (B, C0, H, W).

``manifest.json`` beside them names the inputs, the opset, the dtype, the feature spec, the sha256
of each file and a fingerprint of the weights, so a cached export is reused only for its model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from featinv.errors import FeatInvError
from featinv.files import staged_folder
from featinv.models.featinv_model import FeatInvModel
from featinv.weights import file_sha256, update_digest

MANIFEST = "manifest.json"
DENOISER_FILE, HINT_FILE = "denoiser.onnx", "hint_encoder.onnx"
DENOISER_INPUTS = ("sample", "timestep", "context", "hint")


class DenoiserGraph(torch.nn.Module):
    """(sample, timestep, context, hint) -> eps: what ``FeatInvModel.predict_noise`` computes."""

    def __init__(self, model: FeatInvModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, hint: torch.Tensor
    ) -> torch.Tensor:
        return self.model.predict_noise(sample, timestep, context, hint)


class HintEncoderGraph(torch.nn.Module):
    """features (B, C, h, w) -> hint (B, C0, H, W)."""

    def __init__(self, model: FeatInvModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.controlnet.embed(features)


def model_fingerprint(model: FeatInvModel) -> str:
    """sha256 over the names and bytes of the UNet, ControlNet and context tensors."""
    digest = hashlib.sha256()
    parts = {"unet": model.unet.state_dict(), "controlnet": model.controlnet.state_dict()}
    parts["contexts"] = {"context": model.context, "null_context": model.null_context}
    for part, state in parts.items():
        update_digest(digest, part, state)
    return digest.hexdigest()


def _example_inputs(model: FeatInvModel, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(batch, *model.feature_spec.shape, generator=generator).to(dtype)
    with torch.no_grad():
        hint = model.controlnet.embed(features)
    sample = torch.randn(batch, *model.latent_shape, generator=generator).to(dtype)
    timestep = torch.full((batch,), 500, dtype=torch.int64)
    return sample, timestep, model.context.expand(batch, -1, -1).contiguous(), hint, features


EXPORTERS = {"torchscript": 17, "dynamo": 18}  # exporter -> its default (and for dynamo lowest) opset
MIN_OPSET = 14  # scaled_dot_product_attention and the UNet's other ops export from here on


def opset_range(exporter: str) -> tuple[int, int]:
    """The opsets (lowest, highest) the installed torch.onnx writes with ``exporter``."""
    from torch.onnx import _constants

    if exporter == "dynamo":
        return EXPORTERS["dynamo"], int(getattr(_constants, "ONNX_MAX_OPSET", EXPORTERS["dynamo"]))
    return MIN_OPSET, int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", EXPORTERS["torchscript"]))


def _export(
    module: torch.nn.Module, args: tuple, path: Path, names: list[str], output: str, opset: int, exporter: str
) -> None:
    with warnings.catch_warnings():
        # diffusers' shape-dependent fast paths (e.g. batch >= 64) are traced as constants: same numbers.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=names,
            output_names=[output],
            dynamic_axes={name: {0: "batch"} for name in [*names, output]},
            opset_version=opset,
            dynamo=exporter == "dynamo",
        )


def export_onnx(
    model: FeatInvModel,
    out: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    opset: int | None = None,
    check: bool = True,
    fingerprint: str | None = None,
    exporter: str = "torchscript",
) -> dict[str, Any]:
    """Export ``denoiser.onnx`` and ``hint_encoder.onnx`` into ``out`` (written atomically, with
    ``manifest.json``); run ``onnx.checker`` with ``full_check`` on both. Returns the manifest.
    ``fingerprint``: :func:`model_fingerprint` of ``model`` when the caller has it already.
    ``exporter``: ``torchscript`` (torch.onnx's TorchScript exporter, deprecated by torch, fast) or
    ``dynamo`` (``torch.onnx.export(dynamo=True)``, its successor: needs onnxscript, opset >= 18,
    about ten times slower to export). ``opset``: default 17 for torchscript, 18 for dynamo.

    Raises:
        FeatInvError: onnx (or for dynamo onnxscript) is not installed, a bad exporter or opset, or a
            graph fails the checker.
    """
    try:
        import onnx
    except ImportError as error:
        raise FeatInvError("ONNX export needs onnx: pip install 'featinv[onnx]' (onnx, onnxruntime)") from error
    if dtype not in (torch.float32, torch.float16):
        raise FeatInvError(f"dtype must be float32 or float16, got {dtype}")
    if exporter not in EXPORTERS:
        raise FeatInvError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    opset = EXPORTERS[exporter] if opset is None else opset
    low, high = opset_range(exporter)
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        raise FeatInvError(f"opset must be an integer in [{low}, {high}] for the {exporter} exporter, got {opset!r}")
    if exporter == "dynamo":
        try:
            import onnxscript  # noqa: F401
        except ImportError as error:
            raise FeatInvError("the dynamo exporter needs onnxscript: pip install 'featinv[onnx]'") from error
    out = Path(out)
    source = model
    first = next(model.unet.parameters())
    if first.device.type != "cpu" or first.dtype != dtype:  # export a converted copy, not the caller's model
        model = copy.deepcopy(model).to("cpu", dtype)
    model.eval()
    sample, timestep, context, hint, features = _example_inputs(model, 2, dtype)
    with staged_folder(out, merge=True, last=MANIFEST) as staging:  # the manifest last: a complete export
        with torch.no_grad():
            _export(
                DenoiserGraph(model),
                (sample, timestep, context, hint),
                staging / DENOISER_FILE,
                list(DENOISER_INPUTS),
                "eps",
                opset,
                exporter,
            )
            _export(HintEncoderGraph(model), (features,), staging / HINT_FILE, ["features"], "hint", opset, exporter)
        if check:
            for name in (DENOISER_FILE, HINT_FILE):
                try:
                    onnx.checker.check_model(str(staging / name), full_check=True)
                except onnx.checker.ValidationError as error:
                    raise FeatInvError(f"exported {name} fails the ONNX checker: {error}") from error
        manifest = {
            "format": "featinv-onnx",
            "version": 1,
            "opset": opset,
            "exporter": exporter,
            "dtype": str(dtype).removeprefix("torch."),
            "model_fingerprint": fingerprint or model_fingerprint(source),
            "feature_spec": model.feature_spec.to_dict(),
            "latent_shape": list(model.latent_shape),
            "context_shape": list(model.context.shape[1:]),
            "hint_shape": list(hint.shape[1:]),
            "inputs": {DENOISER_FILE: list(DENOISER_INPUTS), HINT_FILE: ["features"]},
            "outputs": {DENOISER_FILE: ["eps"], HINT_FILE: ["hint"]},
            "sha256": {p.name: file_sha256(p) for p in staging.iterdir()},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The manifest of a complete export in ``folder``, or None when there is none."""
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
