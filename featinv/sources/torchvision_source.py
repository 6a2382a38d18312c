"""torchvision classifiers: ``torchvision.models.get_model(name, weights=None)``, weights from a
local file; input size, normalisation and eval crop as the model's weights define them (their
``transforms()``)."""

from __future__ import annotations

import difflib
from typing import Any

from featinv.errors import FeatInvError
from featinv.sources.base import IMAGENET_MEAN, IMAGENET_STD, DataConfig
from featinv.sources.by_path import ModulePathBackbone, kwargs_failure


class TorchvisionBackbone(ModulePathBackbone):
    """``torchvision.models.get_model(name, **model_kwargs)``; ``pretrained`` downloads torchvision's
    ``DEFAULT`` weights (only when asked)."""

    source = "torchvision"

    def __init__(self, name: str, *, pretrained: bool = False, model_kwargs: dict[str, Any] | None = None) -> None:
        import torchvision

        known = torchvision.models.list_models()
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=5)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
            raise FeatInvError(f"unknown torchvision model {name!r}{hint}")
        self.model_kwargs = dict(model_kwargs or {})
        try:
            network = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **self.model_kwargs)
        except Exception as error:  # noqa: BLE001 - a constructor given user fields
            raise kwargs_failure(f"torchvision {name}", self.model_kwargs, error) from error
        super().__init__(name, network)

    def data_config(self) -> DataConfig:
        import torchvision

        size = getattr(self.network, "image_size", None)  # a ViT takes only the size it was built for
        try:
            transform = torchvision.models.get_model_weights(self.name).DEFAULT.transforms()
        except (ValueError, AttributeError, KeyError):  # no published weights: ImageNet's conventions
            side = size or 224
            return DataConfig((3, side, side), IMAGENET_MEAN, IMAGENET_STD, 0.875)
        crop, resize = int(transform.crop_size[0]), int(transform.resize_size[0])
        side = size or crop
        return DataConfig(
            (3, side, side),
            tuple(float(v) for v in transform.mean),
            tuple(float(v) for v in transform.std),
            min(1.0, crop / resize),
        )

    def channels_last(self, path: str) -> bool:
        """torchvision's Swin keeps (B, h, w, C) until its ``permute`` module."""
        swin = type(self.network).__name__.startswith("SwinTransformer")
        return swin and (path == "norm" or path.split(".")[0] == "features")
