"""What every feature source shares: the :class:`Backbone` interface behind
:class:`featinv.features.FeatureExtractor`, a forward hook that stops the pass once a layer has run,
and the conversion of a layer's output (NCHW, NHWC or a token sequence) to (B, C, h, w)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from featinv.errors import FeatInvError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataConfig:
    """The input a classifier expects: ``input_size`` (3, H, W), ``mean``/``std`` of its
    normalisation and its eval crop (``crop_pct``: files are resized to cover ``input_size /
    crop_pct`` and centre-cropped)."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 1.0


class Backbone:
    """One classifier of one source, and the layer whose map is inverted.

    A source builds ``network`` (the whole classifier, an ``nn.Module``: what
    ``FeatureExtractor.classifier`` is) and says how to reach a layer; the extractor does the rest
    (normalisation, the probe pass, the spec). Subclasses set ``source`` and implement
    :meth:`data_config`, :meth:`resolve_layer` and :meth:`features`.
    """

    source = ""

    def __init__(self, name: str, network: nn.Module) -> None:
        self.name = name
        self.network = network

    def describe_name(self) -> str:
        """How errors name the classifier, e.g. ``torchvision resnet18``."""
        return f"{self.source} {self.name}"

    def data_config(self) -> DataConfig:
        raise NotImplementedError

    def resolve_layer(self, layer: str | int | None, input_size: tuple[int, int, int]) -> str | int:
        """Check ``layer`` (None: the source's default) and prepare to capture it; returns the layer
        as the spec records it."""
        raise NotImplementedError

    def features(self, normalized: torch.Tensor) -> torch.Tensor:
        """The resolved layer's map (B, C, h, w) of normalised inputs (B, 3, H, W)."""
        raise NotImplementedError

    def forward(self, normalized: torch.Tensor) -> Any:
        """The whole classifier's forward pass on normalised inputs."""
        return self.network(normalized)

    def probe_failure(self, error: BaseException, input_size: tuple[int, int, int], layer: str | int) -> FeatInvError:
        """The one line for a probe pass that failed."""
        return FeatInvError(
            f"{self.describe_name()} fails on a probe input of size {input_size} at layer {layer}: {first_line(error)}"
        )

    def spec_kwargs(self) -> dict[str, Any]:
        """What the feature spec records as ``model_kwargs``: the constructor's arguments."""
        return dict(getattr(self, "model_kwargs", {}))

    def map_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A weights file's state dict in this network's key names (unchanged by default)."""
        return state

    def logits(self, normalized: torch.Tensor) -> torch.Tensor:
        """(B, K) class scores of normalised inputs; a FeatInvError where there is no head."""
        if self.linear_head() is None:
            raise FeatInvError(
                f"{self.describe_name()} has no classification head: top-1 agreement and class steering need one "
                "(steer with a CAV from concept images instead)"
            )
        return as_logits(self.forward(normalized))

    def linear_head(self) -> nn.Linear | None:
        """The final linear layer (class directions for steering), or None."""
        return last_linear(self.network)

    def has_logits(self) -> bool:
        """Whether the network gives class scores (an encoder such as DINOv2 does not)."""
        return self.linear_head() is not None

    def pre_logits(self, normalized: torch.Tensor) -> torch.Tensor:
        """(B, D): what the linear head reads (its input), or without a head the map's spatial mean."""
        head = self.linear_head()
        if head is None:
            return self.features(normalized).mean((2, 3))
        seen: list[torch.Tensor] = []
        handle = head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            self.forward(normalized)
        finally:
            handle.remove()
        return seen[-1].flatten(1)


def first_line(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def as_logits(output: Any) -> torch.Tensor:
    """A classifier's output as a (B, K) tensor: a tensor, the ``logits`` of a transformers
    output, or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise FeatInvError(f"the classifier returns {type(output).__name__}, not class scores")


def last_linear(network: nn.Module) -> nn.Linear | None:
    """The last ``nn.Linear`` registered in ``network`` (torchvision's ``fc``, ``heads.head``,
    ``classifier.N``), or None."""
    linears = [module for module in network.modules() if isinstance(module, nn.Linear)]
    return linears[-1] if linears else None


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the layer has run."""


class LayerCapture:
    """A forward hook on one module of ``network``: :meth:`run` calls ``forward`` and returns that
    module's output, stopping the pass there (the layers after it do not run)."""

    def __init__(self, network: nn.Module, path: str) -> None:
        self.path = path
        self._captured: Any = None
        self._capturing = False
        dict(network.named_modules())[path].register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self._capturing:
            self._captured = output
            raise _Captured

    def run(self, forward: Callable[[], Any]) -> Any:
        self._captured, self._capturing = None, True
        try:
            forward()
        except _Captured:
            pass
        finally:
            self._capturing = False
        output, self._captured = self._captured, None
        if output is None:
            raise FeatInvError(f"layer {self.path!r} did not run in the forward pass of the classifier")
        return output


def first_tensor(output: Any, where: str) -> torch.Tensor:
    """A layer's output tensor (the first of a tuple, as transformer blocks return)."""
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise FeatInvError(f"{where} does not return a tensor; choose another layer")
    return output


def tokens_to_map(
    tokens: torch.Tensor, grid: tuple[int, int], where: str, *, prefix: int | None = None
) -> torch.Tensor:
    """(B, N, D) tokens to (B, D, h, w): the last ``h * w`` tokens are the patches in row-major
    order; the ones before them (CLS, registers, distillation) are dropped. ``prefix``, when the
    model's config says how many there are, is checked."""
    height, width = grid
    extra = tokens.shape[1] - height * width
    if extra < 0 or (prefix is not None and extra != prefix):
        expected = f"{prefix} + " if prefix is not None else ""
        raise FeatInvError(
            f"{where} gives {tokens.shape[1]} tokens, not {expected}{height}x{width} patches of the input grid"
        )
    patches = tokens[:, extra:]
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


def square_grid(count: int, where: str) -> tuple[int, int]:
    """The square grid of ``count`` patch tokens (when no patch size is known)."""
    side = int(round(count**0.5))
    if side * side != count:
        raise FeatInvError(f"{where} gives {count} tokens, which do not form a grid")
    return side, side


def patch_size_of(network: nn.Module) -> int | None:
    """A ViT-like network's patch side: its ``patch_size`` attribute, or the stride of its first
    convolution whose kernel equals its stride (the patch embedding)."""
    size = getattr(network, "patch_size", None)
    if isinstance(size, int):
        return size
    if isinstance(size, (tuple, list)) and size and isinstance(size[0], int):
        return int(size[0])
    for module in network.modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size == module.stride and module.stride[0] > 1:
            return int(module.stride[0])
    return None


def module_layer_choices(network: nn.Module) -> list[str]:
    """The top-level module paths, as error messages list them."""
    return [name for name, _ in network.named_children()]


def check_module_path(network: nn.Module, layer: Any, what: str) -> str:
    """``layer`` as a module path of ``network``, or a FeatInvError listing the top-level ones."""
    if isinstance(layer, str) and layer and layer in dict(network.named_modules()):
        return layer
    raise FeatInvError(
        f"unknown layer {layer!r} for {what}; valid layers: module paths such as "
        + ", ".join(module_layer_choices(network))
    )


def last_spatial_child(network: nn.Module, input_size: tuple[int, int, int], what: str) -> str:
    """The default layer of a network named by module paths: the last top-level module whose
    output is a map with more than one position (B, C, h, w), or a token sequence (B, N, D)."""
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        child.register_forward_hook(lambda module, args, out, name=name: outputs.__setitem__(name, out))
        for name, child in network.named_children()
    ]
    try:
        with torch.no_grad():
            network(torch.zeros(1, *input_size))
    finally:
        for handle in handles:
            handle.remove()
    spatial = [
        name
        for name, _ in network.named_children()
        if isinstance(out := outputs.get(name), torch.Tensor)
        and ((out.ndim == 4 and out.shape[2] * out.shape[3] > 1) or out.ndim == 3)
    ]
    if not spatial:
        raise FeatInvError(f"{what} has no top-level module with a spatial output: pass --layer MODULE_PATH")
    return spatial[-1]
