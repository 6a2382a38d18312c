"""Hugging Face transformers vision models: a local model folder or a hub id the user passes
(DINOv2 with or without registers, CLIP and SigLIP vision towers, ViT/DeiT/BEiT, and their
``*ForImageClassification``). A layer is a hidden-state index (0: the embeddings) or ``last`` (the
final, normalised hidden state); token sequences become (B, C, h, w) on the input's patch grid
(non-square inputs too, with position-embedding interpolation where the model has it), the CLS and
register tokens dropped as the config says. The architecture's config is recorded in the spec, so
a model folder rebuilds the classifier without the folder it came from."""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featinv.errors import FeatInvError
from featinv.sources.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, DataConfig, first_line, tokens_to_map

LAST = "last"
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "_commit_hash")


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise FeatInvError(
            "--source transformers needs the transformers package: pip install 'featinv[transformers]'"
        ) from error
    return transformers


@contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """transformers' loading progress bar and load report off for the block, then as they were."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _config_dict(config: Any) -> dict[str, Any]:
    """A config as the JSON object the spec stores (no versions or source paths)."""
    data = json.loads(config.to_json_string(use_diff=False))
    return {key: value for key, value in data.items() if key not in VOLATILE_CONFIG_KEYS}


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        if "shortest_edge" in value:
            return int(value["shortest_edge"]), int(value["shortest_edge"])
    return None


class TransformersBackbone(Backbone):
    """``AutoModel`` (or the class the config's ``architectures`` names) of a folder or hub id.

    ``model_kwargs``: config fields to override, or ``{"config": {...}}``, a whole config (what the
    spec records; with it nothing is read from ``name``). ``pretrained``: read the weights from
    ``name`` (safetensors only); otherwise the network starts at random and the caller loads weights.
    """

    source = "transformers"

    def __init__(self, name: str, *, pretrained: bool = True, model_kwargs: dict[str, Any] | None = None) -> None:
        transformers = _transformers()
        model_kwargs = dict(model_kwargs or {})
        self.source_name = name
        stored = model_kwargs.pop("config", None)
        try:
            if stored is not None:
                if not isinstance(stored, dict) or "model_type" not in stored:
                    raise FeatInvError("model_kwargs config must be a transformers config object with a model_type")
                fields = {k: v for k, v in stored.items() if k != "model_type"}
                config = transformers.AutoConfig.for_model(stored["model_type"], **fields, **model_kwargs)
            else:
                config = transformers.AutoConfig.from_pretrained(name, **model_kwargs)
        except FeatInvError:
            raise
        except Exception as error:  # noqa: BLE001 - a missing folder, an unknown hub id, a bad field
            raise FeatInvError(f"cannot read a transformers config from {name!r} ({first_line(error)})") from error
        self.tower = getattr(config, "vision_config", None) is not None  # CLIP, SigLIP: the vision tower only
        if self.tower:
            config = config.vision_config
        model_class = self._model_class(transformers, config)
        try:
            if pretrained and stored is None:
                with _quiet(transformers):  # no progress bar; no report of a CLIP's text tower left unread
                    network = model_class.from_pretrained(name, config=config, use_safetensors=True)
            else:
                network = (
                    model_class.from_config(config) if model_class is transformers.AutoModel else model_class(config)
                )
        except Exception as error:  # noqa: BLE001 - no weights, pickle-only weights, a bad config
            raise FeatInvError(f"cannot build the transformers model {name!r} ({first_line(error)})") from error
        super().__init__(name, network)
        self.config = network.config
        self.layer: str | int = LAST
        self._own_size = _pair(getattr(self.config, "image_size", None))
        self._interpolates = "interpolate_pos_encoding" in inspect.signature(network.forward).parameters

    @staticmethod
    def _model_class(transformers: Any, config: Any) -> Any:
        """The class the config's ``architectures`` names when it fits the config (a
        ``*ForImageClassification`` keeps its head), else ``AutoModel``."""
        for name in getattr(config, "architectures", None) or []:
            candidate = getattr(transformers, name, None)
            if isinstance(candidate, type) and getattr(candidate, "config_class", None) is type(config):
                return candidate
        return transformers.AutoModel

    def spec_kwargs(self) -> dict[str, Any]:
        """What the spec records: the whole architecture config."""
        return {"config": _config_dict(self.config)}

    def describe_name(self) -> str:
        return f"transformers {self.name}"

    def _processor_config(self) -> dict[str, Any]:
        """The folder's (or cached hub id's) ``preprocessor_config.json``, or {}."""
        path = Path(self.source_name) / "preprocessor_config.json"
        if not path.is_file():
            try:
                from transformers.utils import cached_file

                found = cached_file(
                    self.source_name, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False
                )
            except Exception:  # noqa: BLE001 - no processor config: the defaults below
                return {}
            if found is None:
                return {}
            path = Path(found)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def data_config(self) -> DataConfig:
        processor = self._processor_config()
        crop = _pair(processor.get("crop_size")) if processor.get("do_center_crop", True) else None
        size = _pair(processor.get("size"))
        side = crop or size or _pair(getattr(self.config, "image_size", None)) or (224, 224)
        crop_pct = 1.0
        if crop and size and isinstance(processor.get("size"), dict) and "shortest_edge" in processor["size"]:
            crop_pct = min(1.0, crop[0] / size[0])
        mean = tuple(float(v) for v in processor.get("image_mean", IMAGENET_MEAN))
        std = tuple(float(v) for v in processor.get("image_std", IMAGENET_STD))
        return DataConfig((3, *side), mean, std, crop_pct)

    def _hidden_state_count(self) -> int:
        layers = getattr(self.config, "num_hidden_layers", None)
        if not isinstance(layers, int):
            raise FeatInvError(f"{self.describe_name()} has no num_hidden_layers: use --layer last")
        return layers + 1

    def resolve_layer(self, layer: str | int | None, input_size: tuple[int, int, int]) -> str | int:
        if layer is None or layer == LAST:
            self.layer = LAST
            return LAST
        if isinstance(layer, str) and layer.lstrip("-").isdigit():
            layer = int(layer)
        count = self._hidden_state_count()
        if not isinstance(layer, int) or not -count <= layer < count:
            raise FeatInvError(
                f"unknown layer {layer!r} for {self.describe_name()}; valid layers: last, or a hidden-state index "
                f"in [0, {count - 1}] (0: the embeddings)"
            )
        self.layer = layer
        return layer

    def _call_kwargs(self, normalized: torch.Tensor) -> dict[str, Any]:
        """``interpolate_pos_encoding`` where the model takes it and the input is not its own size."""
        other_size = self._own_size != tuple(normalized.shape[-2:])
        return {"interpolate_pos_encoding": True} if self._interpolates and other_size else {}

    def forward(self, normalized: torch.Tensor) -> Any:
        return self.network(pixel_values=normalized, **self._call_kwargs(normalized))

    def features(self, normalized: torch.Tensor) -> torch.Tensor:
        base = self.network.base_model  # the bare encoder, also under a classification head
        kwargs = self._call_kwargs(normalized)
        if self.layer == LAST:
            output = base(pixel_values=normalized, **kwargs).last_hidden_state
            where = "the last hidden state"
        else:
            output = base(pixel_values=normalized, output_hidden_states=True, **kwargs).hidden_states[self.layer]
            where = f"hidden state {self.layer}"
        if output.ndim == 4:  # convolutional models (ConvNeXt, ResNet) give maps already
            return output
        patch = _pair(getattr(self.config, "patch_size", None))
        if patch is None:
            raise FeatInvError(f"{self.describe_name()} has no patch_size in its config: its tokens form no grid")
        grid = (normalized.shape[-2] // patch[0], normalized.shape[-1] // patch[1])
        registers = getattr(self.config, "num_register_tokens", None)
        prefix = 1 + registers if isinstance(registers, int) else None
        return tokens_to_map(output, grid, f"{self.describe_name()} {where}", prefix=prefix)

    def linear_head(self) -> nn.Linear | None:
        head = getattr(self.network, "classifier", None)
        return head if isinstance(head, nn.Linear) else None
