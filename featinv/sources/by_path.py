"""Networks whose layers are named by module path (``layer3``, ``features.6``, ``encoder``): the
torchvision and user-module sources. A 4-d output is a map (channels-last for torchvision's Swin);
a token sequence (B, N, D) becomes the grid of the input's patches, the tokens before them (CLS)
dropped."""

from __future__ import annotations

from typing import Any

import torch

from featinv.errors import FeatInvError
from featinv.sources.base import (
    Backbone,
    LayerCapture,
    check_module_path,
    first_line,
    first_tensor,
    last_spatial_child,
    patch_size_of,
    square_grid,
    tokens_to_map,
)


class ModulePathBackbone(Backbone):
    """A layer is a module path; the default is the last top-level module with a spatial output."""

    def resolve_layer(self, layer: str | int | None, input_size: tuple[int, int, int]) -> str | int:
        if layer is None:
            path = last_spatial_child(self.network, input_size, self.describe_name())
        else:
            path = check_module_path(self.network, layer, self.describe_name())
        self._capture = LayerCapture(self.network, path)
        return path

    def features(self, normalized: torch.Tensor) -> torch.Tensor:
        where = f"layer {self._capture.path!r}"
        output = first_tensor(self._capture.run(lambda: self.forward(normalized)), where)
        return self._to_nchw(output, tuple(normalized.shape[-2:]), where)

    def _to_nchw(self, output: torch.Tensor, input_hw: tuple[int, int], where: str) -> torch.Tensor:
        if output.ndim == 4:
            return output.permute(0, 3, 1, 2) if self.channels_last(self._capture.path) else output
        if output.ndim == 3:
            patch = patch_size_of(self.network)
            grid = (input_hw[0] // patch, input_hw[1] // patch) if patch else square_grid(output.shape[1], where)
            return tokens_to_map(output, grid, where)
        raise FeatInvError(f"{where} gives a {output.ndim}-d output {tuple(output.shape)}, not a spatial map")

    def channels_last(self, path: str) -> bool:
        """Whether the 4-d output of module ``path`` is (B, h, w, C)."""
        return False


def kwargs_failure(what: str, model_kwargs: dict[str, Any], error: BaseException) -> FeatInvError:
    """One line for a constructor that refused the user's ``model_kwargs``."""
    given = f" with --classifier-kwargs {model_kwargs}" if model_kwargs else ""
    return FeatInvError(f"{what} cannot be built{given} ({first_line(error)})")
