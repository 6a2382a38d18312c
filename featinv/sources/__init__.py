"""Where a classifier comes from: timm, torchvision, Hugging Face transformers, or the user's own
module. Each source builds a :class:`~featinv.sources.base.Backbone`; :class:`featinv.features.FeatureExtractor`
is the one interface over them all."""

from __future__ import annotations

from typing import Any

from featinv.choices import FEATURE_SOURCES
from featinv.errors import FeatInvError
from featinv.sources.base import Backbone, DataConfig

__all__ = ["FEATURE_SOURCES", "Backbone", "DataConfig", "build_backbone", "check_source"]


def check_source(source: Any, where: str = "source") -> str:
    if source not in FEATURE_SOURCES:
        raise FeatInvError(f"{where} must be one of {', '.join(FEATURE_SOURCES)}, got {source!r}")
    return source


def build_backbone(
    source: str, name: str, *, pretrained: bool | None = None, model_kwargs: dict[str, Any] | None = None
) -> Backbone:
    """The classifier ``name`` of ``source``. ``pretrained`` None: the source's default (timm and
    torchvision start at random and download nothing; transformers reads the weights of the folder
    or hub id it is given)."""
    check_source(source)
    if source == "timm":
        from featinv.sources.timm_source import TimmBackbone as backbone_class
    elif source == "torchvision":
        from featinv.sources.torchvision_source import TorchvisionBackbone as backbone_class
    elif source == "transformers":
        from featinv.sources.transformers_source import TransformersBackbone as backbone_class
    else:
        from featinv.sources.module_source import ModuleBackbone as backbone_class
    options = {} if pretrained is None else {"pretrained": pretrained}
    return backbone_class(name, model_kwargs=model_kwargs, **options)
