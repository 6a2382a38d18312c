"""Feature maps from any classifier and any layer, as (B, C, h, w) tensors.

The classifier comes from a source (:mod:`featinv.sources`): ``timm`` (the default), ``torchvision``,
``transformers`` or ``module`` (the user's own). A timm layer is named in one of three ways:

* ``None`` or ``"forward_features"``: the output of ``model.forward_features`` (the penultimate
  map, as in the FeatInv paper);
* an integer (or a string of one): an index into the model's ``feature_info``;
* a module path such as ``"layer4"`` or ``"stages.3"``.

torchvision and user modules name layers by module path; transformers by hidden-state index or
``last``. CNN maps (B, C, h, w), channels-last maps (Swin, (B, h, w, C)) and ViT token sequences
(B, N, D) with prefix tokens are all returned as (B, C, h, w). The shapes come from a real forward
pass on a dummy input, never from constants.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from featinv.choices import FEATURE_MODES
from featinv.errors import FeatInvError
from featinv.limits import LIMITS
from featinv.sources import build_backbone, check_source
from featinv.weights import load_state_dict

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
        model: the classifier's name in its source: a timm or torchvision model name, a
            transformers folder or hub id, or a module's ``package.module:factory``.
        layer: ``"forward_features"``, a ``feature_info`` index, or a module path (timm); a module
            path (torchvision, module); a hidden-state index or ``"last"`` (transformers).
        mode: ``"spatial"`` or ``"pooled"`` (the global average tiled over the grid).
        channels, height, width: the feature map's shape (C, h, w).
        input_size: the classifier's input (3, H, W).
        mean, std: the classifier's input normalisation.
        model_kwargs: keyword arguments given to the model's constructor (transformers: its
            whole config, ``{"config": {...}}``).
        crop_pct: the classifier's eval crop (timm's ``crop_pct``): image files are resized to
            cover ``input_size / crop_pct`` and centre-cropped (1.0 for folders written before).
        source: where the classifier comes from (:data:`featinv.choices.FEATURE_SOURCES`;
            ``"timm"`` for folders written before).
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
    source: str = "timm"

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, h, w)."""
        return (self.channels, self.height, self.width)

    def describe(self) -> str:
        """A one-line description, e.g. ``resnet18 layer 'layer4' (512x7x7, spatial)`` (a source
        other than timm first: ``torchvision resnet18 layer 'layer3' (...)``)."""
        source = "" if self.source == "timm" else f"{self.source} "
        return f"{source}{self.model} layer {self.layer!r} ({self.channels}x{self.height}x{self.width}, {self.mode})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "feature_spec") -> FeatureSpec:
        """A spec from its stored dict, every field checked (type, range, shape): a FeatInvError
        naming ``where``, the field, its value and what was expected."""
        if not isinstance(data, dict):
            raise FeatInvError(f"{where} must be an object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        required = names - {"model_kwargs", "crop_pct", "source"}
        if missing := sorted(required - set(data)):
            raise FeatInvError(f"{where} lacks {', '.join(missing)}")
        if extra := sorted(set(data) - names):
            raise FeatInvError(f"{where} has unknown fields {', '.join(extra)} (expected {', '.join(sorted(names))})")

        def bad(field_name: str, expected: str) -> FeatInvError:
            return FeatInvError(f"{where}: {field_name} must be {expected}, got {data[field_name]!r}")

        def is_int(value: Any, low: int, high: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

        source = check_source(data.get("source", "timm"), f"{where}: source")
        if not isinstance(data["model"], str) or not data["model"]:
            raise bad("model", f"a {source} model name" if source != "module" else "package.module:factory")
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
            raise bad("model_kwargs", "an object of the model constructor's arguments")
        crop = data.get("crop_pct", 1.0)
        if not (_is_number(crop) and 0 < crop <= 1):
            raise bad("crop_pct", "a number in (0, 1]")
        values = dict(data)
        for key in ("input_size", "mean", "std"):
            values[key] = tuple(values[key])
        return cls(**values)

    def same_source(self, other: FeatureSpec) -> bool:
        """Whether both specs describe the same classifier and layer (mode may differ)."""
        return (self.source, self.model, self.layer, self.model_kwargs, self.shape) == (
            other.source,
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


class FeatureExtractor(nn.Module):
    """A frozen classifier that returns the feature map of one layer.

    Args:
        model: the classifier's name in ``source``: a timm or torchvision name (``"resnet50"``), a
            transformers folder or hub id, or ``package.module:factory`` / ``path/file.py:factory``.
        layer: timm: ``None``/``"forward_features"``, a ``feature_info`` index, or a module path;
            torchvision and module: a module path (default: the last top-level spatial output);
            transformers: a hidden-state index or ``"last"`` (default).
        source: ``"timm"`` (default), ``"torchvision"``, ``"transformers"`` or ``"module"``.
        mode: ``"spatial"`` (default) or ``"pooled"`` (global average tiled over the grid).
        pretrained: timm/torchvision: download their pretrained weights (only when asked);
            transformers: read the weights of the folder or hub id (the default).
        weights: a local weights file (safetensors, or a ``.pth`` loaded with ``weights_only=True``).
        model_kwargs: extra constructor arguments (e.g. a tiny config for tests); transformers:
            config fields, or ``{"config": {...}}``, a whole config.
        input_size: the classifier's input (3, H, W); by default the model's own.
        mean, std: the input normalisation (three numbers each); by default the model's own.
    """

    def __init__(
        self,
        model: str,
        layer: str | int | None = None,
        *,
        source: str = "timm",
        mode: str = "spatial",
        pretrained: bool | None = None,
        weights: str | Path | None = None,
        model_kwargs: dict[str, Any] | None = None,
        input_size: tuple[int, int, int] | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise FeatInvError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        check_source(source)
        self.backbone = build_backbone(source, model, pretrained=pretrained, model_kwargs=model_kwargs)
        self.classifier = self.backbone.network
        if weights is not None:
            self.load_classifier_weights(weights)
        self.classifier.eval().requires_grad_(False)
        data_config = self.backbone.data_config()
        input_size = tuple(int(v) for v in (input_size if input_size is not None else data_config.input_size))
        if len(input_size) != 3 or input_size[0] != 3 or min(input_size) < 1 or max(input_size) > MAX_INPUT_SIDE:
            raise FeatInvError(f"input_size must be (3, H, W) with H, W in [1, {MAX_INPUT_SIDE}], got {input_size}")
        mean = _normalization("mean", mean if mean is not None else data_config.mean)
        std = _normalization("std", std if std is not None else data_config.std)
        self.layer = self.backbone.resolve_layer(layer, input_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

        try:
            with torch.no_grad():
                probe = self._features(torch.zeros(1, *input_size))
        except FeatInvError:
            raise
        except Exception as error:  # noqa: BLE001 - the probe pass of a model built from user fields
            raise self.backbone.probe_failure(error, input_size, self.layer) from error
        self.spec = FeatureSpec(
            model=self.backbone.name,
            layer=self.layer,
            mode=mode,
            channels=int(probe.shape[1]),
            height=int(probe.shape[2]),
            width=int(probe.shape[3]),
            input_size=input_size,
            mean=mean,
            std=std,
            model_kwargs=self.backbone.spec_kwargs(),
            crop_pct=data_config.crop_pct,
            source=source,
        )

    @classmethod
    def from_spec(
        cls, spec: FeatureSpec, *, weights: str | Path | None = None, trust_code: bool = False
    ) -> FeatureExtractor:
        """Rebuild the extractor a spec describes (random weights unless ``weights`` is given).

        A spec that names a user module (``source="module"``) imports and runs it: refused unless
        ``trust_code``.
        """
        if spec.source == "module" and not trust_code:
            raise FeatInvError(
                f"the classifier is the module {spec.model}: loading it would import and run that code; "
                "pass --trust-code (trust_code=True) if you trust it"
            )
        extractor = cls(
            spec.model,
            spec.layer,
            source=spec.source,
            mode=spec.mode,
            pretrained=False,
            weights=weights,
            model_kwargs=spec.model_kwargs,
            input_size=spec.input_size,
            mean=spec.mean,
            std=spec.std,
        )
        extractor.spec = replace(extractor.spec, crop_pct=spec.crop_pct)  # the eval crop the model was made with
        return extractor

    def load_classifier_weights(self, weights: str | Path | dict[str, torch.Tensor]) -> None:
        """Load a state dict (a path or a dict) into the classifier, strictly."""
        state = weights if isinstance(weights, dict) else load_state_dict(weights, what="classifier weights")
        state = self.backbone.map_state(state)
        result = self.classifier.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise FeatInvError(
                f"classifier weights do not fit {type(self.classifier).__name__}: "
                f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
                f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[:3]})"
            )

    def _features(self, normalized: torch.Tensor) -> torch.Tensor:
        return self.backbone.features(normalized)

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
        """The classifier's logits (B, num_classes) for (B, 3, H, W) images in [0, 1] (a
        FeatInvError for a model without a classification head)."""
        return self.backbone.logits(self.preprocess(images))

    def logits_normalized(self, normalized: torch.Tensor) -> torch.Tensor:
        """:meth:`logits` of inputs already through :meth:`normalize` (differentiable)."""
        return self.backbone.logits(normalized)

    def pre_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D): what the classifier's head reads (its penultimate vector), or for a model
        without a head the map's spatial mean."""
        return self.backbone.pre_logits(self.preprocess(images))

    def linear_head(self) -> nn.Linear | None:
        """The classifier's final linear layer (class directions for steering), or None."""
        return self.backbone.linear_head()

    @property
    def has_logits(self) -> bool:
        """Whether :meth:`logits` has class scores to give (not for encoders such as DINOv2)."""
        return self.backbone.has_logits()


def _normalization(name: str, values: Any) -> tuple[float, float, float]:
    """``mean`` or ``std``: three finite numbers (std > 0)."""
    values = tuple(values) if isinstance(values, (list, tuple)) else ()
    if len(values) != 3 or not all(_is_number(v) for v in values) or (name == "std" and min(values) <= 0):
        raise FeatInvError(f"{name} must be three numbers{' > 0' if name == 'std' else ''}, got {values!r}")
    return tuple(float(v) for v in values)


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
