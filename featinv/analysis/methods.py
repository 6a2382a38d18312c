"""The ways to invert a feature map, in one registry that ``featinv reconstruct`` and the studies
(``evaluate``, ``steer``, ``compose``, ``robustness``) both dispatch through.

Each :class:`InversionMethod` says what it needs (a FeatInv model, its trained ControlNet, the
classifier), which denoiser backends it runs on and whether it takes ``guidance`` (what
classifier-free guidance guides on), and builds an :class:`Inverter` from them::

    invert = inversion_method("hybrid").inverter(reconstructor, settings=InversionSettings(steps=10))
    images = invert(features, seed=0)          # (B, C, h, w) -> (B, 3, H, W) in [0, 1]

The names are :data:`featinv.choices.METHODS` (the CLI reads them without importing torch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from featinv.analysis import optimize as optimization
from featinv.analysis.guided import GuidanceConfig, GuidedReconstructor
from featinv.analysis.hybrid import HybridConfig, HybridReconstructor
from featinv.analysis.optimize import OptimizeConfig
from featinv.errors import FeatInvError
from featinv.features import FeatureExtractor
from featinv.models.featinv_model import FeatInvModel
from featinv.pipeline import Reconstructor, resolve_device


class Inverter(Protocol):
    """Feature maps (B, C, h, w) -> images (B, 3, H, W) in [0, 1]; image i from noise (or, for
    ``optimize``, the batch from a start) seeded ``seed + first_index + i`` (``optimize``: ``seed``)."""

    def __call__(
        self,
        features: torch.Tensor,
        *,
        seed: int = 0,
        first_index: int = 0,
        batch_size: int = 64,
        progress: bool = False,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class InversionSettings:
    """How a method runs; ``None`` is the method's (or the model's) default.

    Attributes:
        steps, sampler, guidance_scale, eta: FeatInv's and hybrid's sampling (guided: ``guided``).
        guidance: what classifier-free guidance guides on (``features`` or ``prompt``).
        hybrid, guided, optimize: each method's own settings.
        opt_steps: the optimisation baseline's Adam steps, when ``optimize`` is not given.
        image_size: the optimisation baseline's (H, W) (default the classifier's input size).
    """

    steps: int | None = None
    sampler: str | None = None
    guidance_scale: float | None = None
    guidance: str | None = None
    eta: float = 0.0
    hybrid: HybridConfig | None = None
    guided: GuidanceConfig | None = None
    optimize: OptimizeConfig | None = None
    opt_steps: int | None = None
    image_size: tuple[int, int] | None = None


# (reconstructor or None, model or None, classifier or None, device, settings) -> the method's Inverter
Builder = Callable[
    [Reconstructor | None, FeatInvModel | None, FeatureExtractor | None, torch.device, InversionSettings], Inverter
]


@dataclass(frozen=True)
class InversionMethod:
    """One way to invert, and what it takes.

    Attributes:
        name: its name in :data:`featinv.choices.METHODS`.
        summary: one line for help texts and reports.
        needs_model: it samples a FeatInv model (False: the classifier alone serves).
        uses_controlnet: it needs the model's trained ControlNet (guided samples the base alone,
            so an untrained model and any classifier serve).
        needs_classifier: it takes gradients of (or features from) the classifier.
        backends: the denoiser backends it runs on (empty: it runs no denoiser).
        takes_guidance: it takes ``guidance`` (what classifier-free guidance guides on).
        model_need: what model it needs, for the error without one ("" when it needs none).
        backend_reason: why it runs on ``backends`` only, for the error on another.
    """

    name: str
    summary: str
    needs_model: bool
    uses_controlnet: bool
    needs_classifier: bool
    backends: tuple[str, ...]
    takes_guidance: bool
    _build: Builder = field(repr=False)
    model_need: str = ""
    backend_reason: str = ""

    def check(
        self, *, model: bool = True, classifier: bool = True, backend: str = "eager", guidance: bool = False
    ) -> None:
        """Refuse, in one line naming the option, what this method cannot run with: no model, no
        classifier, ``backend``, a ``guidance`` mode given."""
        if self.needs_model and not model:
            raise FeatInvError(f"--method {self.name} needs --model DIR: {self.model_need}")
        if self.needs_classifier and not classifier:
            raise FeatInvError(
                f"--method {self.name} needs the classifier: the model stores none, pass --classifier-weights"
            )
        if backend != "eager" and backend not in self.backends:
            runs = f"runs on the {' or '.join(self.backends)} backend" if self.backends else "runs no denoiser"
            raise FeatInvError(f"--method {self.name} {runs} ({self.backend_reason}), got --backend {backend}")
        if guidance and not self.takes_guidance:
            takes = " or ".join(m.name for m in REGISTRY.values() if m.takes_guidance)
            raise FeatInvError(f"--guidance-on applies to --method {takes}, not --method {self.name}")

    def inverter(
        self,
        reconstructor: Reconstructor | None = None,
        *,
        model: FeatInvModel | None = None,
        extractor: FeatureExtractor | None = None,
        device: str | torch.device | None = None,
        settings: InversionSettings = InversionSettings(),
    ) -> Inverter:
        """The :class:`Inverter` of this method. ``reconstructor``: FeatInv's sampler (its backend,
        device and dtype; the model and classifier default to its); or, without one, ``model``,
        ``extractor`` (the optimisation baseline needs only the classifier) and ``device`` (default
        auto)."""
        if reconstructor is not None:
            model = model if model is not None else reconstructor.model
            extractor = extractor if extractor is not None else reconstructor.extractor
        if extractor is None and model is not None:
            extractor = model.classifier
        self.check(model=model is not None, classifier=extractor is not None)
        device = reconstructor.device if reconstructor is not None else resolve_device(device)
        return self._build(reconstructor, model, extractor, device, settings)


def _sampling(settings: InversionSettings) -> dict:
    return {
        "steps": settings.steps,
        "sampler": settings.sampler,
        "guidance_scale": settings.guidance_scale,
        "guidance": settings.guidance,
        "eta": settings.eta,
    }


def _featinv(reconstructor, model, extractor, device, settings) -> Inverter:
    reconstructor = reconstructor or Reconstructor(model, extractor=extractor, device=device)

    def invert(features, *, seed=0, first_index=0, batch_size=64, progress=False):
        return reconstructor.reconstruct(
            features=features,
            seed=seed,
            first_index=first_index,
            batch_size=batch_size,
            progress=progress,
            **_sampling(settings),
        ).images

    return invert


def _hybrid(reconstructor, model, extractor, device, settings) -> Inverter:
    refined = HybridReconstructor(
        model, extractor=extractor, device=device, dtype=model.unet.dtype, config=settings.hybrid
    )
    return _featinv(refined, model, extractor, device, settings)


def _guided(reconstructor, model, extractor, device, settings) -> Inverter:
    guided = GuidedReconstructor(model, extractor=extractor, device=device, config=settings.guided or GuidanceConfig())

    def invert(features, *, seed=0, first_index=0, batch_size=64, progress=False):
        return guided.reconstruct(
            features=features, seed=seed, first_index=first_index, batch_size=batch_size, progress=progress
        ).images

    return invert


def _optimize(reconstructor, model, extractor, device, settings) -> Inverter:
    config = settings.optimize or OptimizeConfig.for_extractor(extractor, settings.opt_steps)
    extractor = extractor.to(device)

    def invert(features, *, seed=0, first_index=0, batch_size=64, progress=False):
        return optimization.invert_by_optimization(
            extractor, features, size=settings.image_size, config=config, seed=seed, progress=progress
        )

    return invert


REGISTRY: dict[str, InversionMethod] = {
    method.name: method
    for method in (
        InversionMethod(
            "featinv",
            "FeatInv: the learned inverter (ControlNet on the frozen base)",
            needs_model=True,
            uses_controlnet=True,
            needs_classifier=False,
            backends=("eager", "compiled", "fast", "onnx", "tensorrt"),
            takes_guidance=True,
            _build=_featinv,
            model_need="the trained FeatInv model to sample",
        ),
        InversionMethod(
            "optimize",
            "the optimisation baseline (Mahendran-Vedaldi) on pixels",
            needs_model=False,
            uses_controlnet=False,
            needs_classifier=True,
            backends=(),
            takes_guidance=False,
            _build=_optimize,
            backend_reason="it optimises pixels",
        ),
        InversionMethod(
            "guided",
            "training-free: the model's base steered by the classifier's gradients",
            needs_model=True,
            uses_controlnet=False,
            needs_classifier=True,
            backends=("eager",),
            takes_guidance=False,
            _build=_guided,
            model_need="a FeatInv model on the base to sample from (an untrained one from 'featinv create --base ... "
            "--classifier ...' serves; its ControlNet is not used)",
            backend_reason="it takes gradients through the base",
        ),
        InversionMethod(
            "hybrid",
            "FeatInv's sampling refined by the classifier's gradients",
            needs_model=True,
            uses_controlnet=True,
            needs_classifier=True,
            backends=("eager",),
            takes_guidance=True,
            _build=_hybrid,
            model_need="the trained FeatInv model whose sampling to refine",
            backend_reason="it takes gradients through the denoiser",
        ),
    )
}


def inversion_method(name: str) -> InversionMethod:
    """The registered method ``name`` (one of :data:`featinv.choices.METHODS`)."""
    if name not in REGISTRY:
        raise FeatInvError(f"method must be one of {', '.join(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


__all__ = ["REGISTRY", "InversionMethod", "InversionSettings", "Inverter", "inversion_method"]
