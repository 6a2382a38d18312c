"""The reconstructor: images or feature maps in, images out."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from featinv.engine import make_denoiser
from featinv.engine.eager import EagerDenoiser
from featinv.errors import FeatInvError, require_positive_int, require_seed
from featinv.features import FeatureExtractor, check_images, pool_and_tile
from featinv.limits import within
from featinv.models.featinv_model import FeatInvModel
from featinv.models.model_config import check_guidance
from featinv.sampling import SAMPLER_LOOPS, classifier_free_guidance
from featinv.sampling.noise import randn

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 1.75
REALTIME_STEPS = 4  # a distilled model's default (its few-step sampler, no guidance)


@dataclass
class Reconstruction:
    """The result of :meth:`Reconstructor.reconstruct`.

    Attributes:
        images: (B, 3, H, W) reconstructions in [0, 1], float32 on the CPU.
        features: (B, C, h, w) the feature maps they were conditioned on.
        samples: (B, C', H', W') final diffusion samples (latents for latent models).
    """

    images: torch.Tensor
    features: torch.Tensor
    samples: torch.Tensor


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU. ``"cuda"`` without a GPU is an error."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise FeatInvError(f"device must be cpu, cuda, cuda:N or auto, got {device!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FeatInvError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    return device


def features_to_invert(
    images: torch.Tensor | None,
    features: torch.Tensor | None,
    features_of: Callable[[torch.Tensor], torch.Tensor],
    spec: Any,
    device: torch.device,
) -> torch.Tensor:
    """The (B, C, h, w) float32 feature maps on ``device`` that a reconstruction inverts: those of
    ``images`` by ``features_of``, or ``features`` checked against ``spec``; exactly one is given."""
    if (images is None) == (features is None):
        raise FeatInvError("pass exactly one of images or features")
    if images is not None:
        return features_of(images)
    spec.check_features(features)
    return features.to(device, torch.float32)


def batch_noise(
    generators: torch.Generator | list[torch.Generator],
    start: int,
    stop: int,
    shape: tuple[int, ...],
    device: torch.device,
    latents: torch.Tensor | None = None,
) -> tuple[torch.Generator | list[torch.Generator], torch.Tensor]:
    """Rows ``start:stop`` of a reconstruction: their generators (one per image, or one shared) and
    their starting noise (stop - start, *shape), so image i's noise never depends on the batch; or
    rows of the given ``latents`` (the generators then untouched, for the sampler's own noise)."""
    batch_generators = generators[start:stop] if isinstance(generators, list) else generators
    if latents is not None:
        return batch_generators, latents[start:stop].to(device, torch.float32)
    return batch_generators, randn((stop - start, *shape), batch_generators, device=device)


def _pad_rows(
    features: torch.Tensor, x: torch.Tensor, pad: bool, exact: Collection[int] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """With ``pad``: (features, x) grown to the next power of two rows (unless their rows are one of
    the ``exact`` sizes), by copies of the last feature map and zero latents (dropped after
    sampling; each row is sampled independently)."""
    rows = len(x)
    size = 1 << (rows - 1).bit_length() if pad and rows not in exact else rows
    if size == rows:
        return features, x
    features = torch.cat([features, features[-1:].expand(size - rows, *features.shape[1:])])
    return features, torch.cat([x, x.new_zeros(size - rows, *x.shape[1:])])


class Reconstructor:
    """Reconstructs images from a classifier's feature maps with a FeatInv model.

    Args:
        model: the FeatInv model.
        extractor: the classifier to take features from images with; defaults to the model's
            stored classifier. Its (model, layer) must be the one the FeatInv model was trained for.
        device: ``cpu``, ``cuda`` or ``auto``.
        dtype: the denoiser's dtype (float32, float16 or bfloat16); samples stay float32.
        backend: the engine backend: ``eager`` (the reference), ``compiled``, ``fast`` (CUDA: the
            whole guided loop in captured graphs, ``featinv.engine.fast``), ``onnx`` or ``tensorrt``.
        engine_dir: the ONNX export / TensorRT engine cache of the ``onnx`` and ``tensorrt``
            backends (exported there on first use; default under ``~/.cache/featinv``).
        pad_batches: run each deterministic denoiser batch (eta = 0) at the next power of two,
            the padding rows dropped: a server's varied batch sizes then need at most 7 compiled
            shapes up to 64 images (torch.compile keeps 8 variants per piece, then runs it eagerly;
            the fast path keeps 8 captured steps), at up to twice the compute of an odd size.
        exact_batches: batch sizes that run as they are even with ``pad_batches`` (the size a
            server warms up at and mostly sees: its requests then do no padded work).
        fast_options: keyword arguments of the ``fast`` backend's ``FastPath``, e.g.
            ``{"twin_encoder": True}`` (``featinv.engine.fast``); only with ``backend="fast"``.
    """

    def __init__(
        self,
        model: FeatInvModel,
        *,
        extractor: FeatureExtractor | None = None,
        device: str | torch.device | None = "cpu",
        dtype: torch.dtype = torch.float32,
        backend: str = "eager",
        engine_dir: str | Path | None = None,
        pad_batches: bool = False,
        exact_batches: Collection[int] = (),
        fast_options: dict[str, Any] | None = None,
    ) -> None:
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise FeatInvError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        if fast_options:
            if backend != "fast":
                raise FeatInvError(f"fast_options apply to backend 'fast' only, got backend {backend!r}")
            from featinv.engine.fast import check_fast_options

            fast_options = check_fast_options(fast_options)
        self.device = resolve_device(device)
        extractor = extractor if extractor is not None else model.classifier
        if extractor is not None and not extractor.spec.same_source(model.feature_spec):
            raise FeatInvError(
                f"this model was trained for {model.feature_spec.describe()}, "
                f"but the classifier gives {extractor.spec.describe()}"
            )
        self.model = model.to(self.device, dtype).eval()
        self.extractor = extractor.to(self.device, torch.float32).eval() if extractor is not None else None
        self.denoiser = make_denoiser(self.model, backend, engine_dir=engine_dir)
        self.pad_batches = pad_batches
        self.exact_batches = frozenset(require_positive_int("exact_batches item", n) for n in exact_batches)
        self.fast = None
        if backend == "fast":
            from featinv.engine.fast import FastPath

            self.fast = FastPath(self.model, **(fast_options or {}))

    @property
    def spec(self):
        return self.model.feature_spec

    @torch.no_grad()
    def features(self, images: torch.Tensor, *, pooled: bool = False) -> torch.Tensor:
        """Feature maps (B, C, h, w) of (B, 3, H, W) images in [0, 1]; ``pooled`` tiles the global mean."""
        if self.extractor is None:
            raise FeatInvError("this model stores no classifier: pass extractor= to Reconstructor to use images")
        check_images(images)
        features = self.extractor(images.to(self.device, torch.float32))
        return pool_and_tile(features) if pooled else features

    @torch.no_grad()
    def reconstruct(
        self,
        images: torch.Tensor | None = None,
        *,
        features: torch.Tensor | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        guidance: str | None = None,
        sampler: str | None = None,
        eta: float = 0.0,
        seed: int = 0,
        first_index: int = 0,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        noise: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        batch_size: int = 8,
        pooled: bool = False,
        progress: bool = True,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> Reconstruction:
        """Reconstruct images from feature maps (given, or taken from ``images``).

        Args:
            images: (B, 3, H, W) in [0, 1]; their feature maps are inverted.
            features: (B, C, h, w) feature maps of the model's spec (instead of ``images``).
            steps: sampler steps (default 50 as published; 4 for a distilled model).
            guidance_scale: classifier-free guidance scale (default 1.75 as published; <= 1
                disables it; a distilled model has it folded in and takes none).
            guidance: what guidance guides on: ``"features"`` (the unconditional branch is the zero
                feature map with the null context) or ``"prompt"`` (the same feature map with the
                null context, as the published FeatInv sampler); default: the model's
                (``model.guidance``). The two agree at ``guidance_scale`` <= 1.
            sampler: ``ddim`` or ``dpmpp`` (DPM-Solver++ 2M), default ``ddim``; a distilled model
                (``model.distillation``) defaults to its own (``model.few_step_sampler``), and a
                consistency-distilled one takes ``lcm`` only.
            eta: DDIM stochasticity in [0, 1].
            seed: image i starts from noise seeded ``seed + first_index + i``, whatever the batch size.
            first_index: the global index of the first image (a shard of a multi-process run).
            generator: instead of ``seed``: one generator for all, or one per image.
            noise: (B, C', H', W') initial noise x_T instead of drawing it from ``seed`` (e.g. to
                compare with another tool from the same noise); the samplers' own noise (eta > 0,
                lcm) still comes from ``seed`` or ``generator``.
            latents: the older name of ``noise``.
            batch_size: images per denoiser batch.
            pooled: with ``images``, condition on pooled-and-tiled features (the baseline).
            progress: show a progress bar.
            callback: called after every step with ``{"i", "t", "x", "denoised", "batch"}``.
        """
        features = features_to_invert(
            images, features, lambda x: self.features(x, pooled=pooled), self.spec, self.device
        )
        n = features.shape[0]
        steps, guidance_scale, sampler = self.sampling_defaults(steps, guidance_scale, sampler)
        guidance = self.model.guidance if guidance is None else check_guidance(guidance)
        self._check_options(steps, guidance_scale, sampler, eta, batch_size)
        generators = self._generators(n, seed, first_index, generator)
        if noise is not None and latents is not None:
            raise FeatInvError("pass noise or latents (its older name), not both")
        name = "noise" if noise is not None else "latents"
        latents = noise if noise is not None else latents
        if latents is not None:
            expected = (n, *self.model.latent_shape)
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
                got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise FeatInvError(f"{name} must have shape {expected}, got {got}")
            if not latents.is_floating_point() or not bool(torch.isfinite(latents).all()):
                raise FeatInvError(f"{name} must be a float tensor of finite values")
        schedule = self.model.noise_schedule.for_sampler(sampler, steps, eta)
        sample_fn = SAMPLER_LOOPS[sampler]
        outputs = []
        bar = tqdm(total=n * steps, desc="reconstructing", unit="step", disable=not progress, leave=False)
        try:
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                shape = self.model.latent_shape
                batch_generators, x = batch_noise(generators, start, stop, shape, self.device, latents)
                rows = stop - start
                # eta > 0 and lcm draw per-image noise every step: padding rows would need generators of their own
                deterministic = eta == 0.0 and sampler != "lcm"
                chunk, x = _pad_rows(features[start:stop], x, self.pad_batches and deterministic, self.exact_batches)

                def on_step(info: dict[str, Any], start: int = start, rows: int = rows) -> None:
                    bar.update(rows)
                    if callback is not None:
                        shown = {key: info[key][:rows] for key in ("x", "denoised") if key in info}
                        callback({**info, **shown, "batch": start // batch_size})

                if self.fast is not None and guidance_scale > 1.0 and eta == 0.0:
                    hook = on_step if callback is not None else None
                    x = self.fast.sample(chunk, x, schedule, guidance_scale, callback=hook, guidance=guidance)
                    bar.update(0 if hook else rows * steps)
                else:
                    denoise = self.batch_denoiser(chunk, guidance_scale, guidance, schedule.timesteps)
                    x = sample_fn(denoise, x, schedule, generator=batch_generators, callback=on_step)
                outputs.append(x[:rows])
        finally:
            bar.close()
        samples = torch.cat(outputs)
        self._check_finite(samples, features, "the sampled latents")
        images_out = torch.cat([self.model.decode(s.to(self.model.unet.dtype)) for s in samples.split(batch_size)])
        self._check_finite(images_out, features, "the decoded images")
        return Reconstruction(images=images_out.float().cpu(), features=features.cpu(), samples=samples.cpu())

    def sampling_defaults(
        self, steps: int | None, guidance_scale: float | None, sampler: str | None
    ) -> tuple[int, float, str]:
        """(steps, guidance_scale, sampler) with the model's defaults filled in: DDIM, 50 steps,
        guidance 1.75, or for a distilled model its few-step sampler (``lcm`` after consistency
        distillation, ``dpmpp`` after guidance distillation), 4 steps, no guidance. Guidance on a
        distilled model, lcm on a model that is not consistency-distilled, or another sampler on one
        that is, raise."""
        few_step = self.model.few_step_sampler
        sampler = sampler if sampler is not None else (few_step or "ddim")
        if sampler == "lcm" and few_step != "lcm":
            raise FeatInvError(
                "the lcm sampler needs a consistency-distilled model (featinv train --model M --distill "
                "--distill-target endpoint), and this one is not: use ddim or dpmpp"
            )
        if few_step == "lcm" and sampler != "lcm":
            raise FeatInvError(f"this model is consistency-distilled: sample it with the lcm sampler, not {sampler!r}")
        if few_step and guidance_scale is not None and guidance_scale > 1.0:
            raise FeatInvError(
                f"this model is distilled with guidance {self.model.distillation['guidance_scale']} "
                f"folded in: guidance_scale must be <= 1, got {guidance_scale}"
            )
        steps = steps if steps is not None else (REALTIME_STEPS if few_step else DEFAULT_STEPS)
        guidance_scale = guidance_scale if guidance_scale is not None else (1.0 if few_step else DEFAULT_GUIDANCE)
        return steps, guidance_scale, sampler

    # ----- helpers ----------------------------------------------------------------------------
    def _check_finite(self, values: torch.Tensor, features: torch.Tensor, what: str) -> None:
        """Never hand back NaN (which the [0, 1] clamp would turn into black) without saying so."""
        if bool(torch.isfinite(values).all()):
            return
        dtype = self.model.unet.dtype
        largest = float(features.abs().max())
        causes = []
        if dtype != torch.float32:
            causes.append(f"the denoiser overflowed in {str(dtype).removeprefix('torch.')} (try dtype float32)")
        if largest > 1e4:
            causes.append(f"the feature maps are extreme (largest |value| {largest:.3g})")
        causes.append("the model's contexts or weights are corrupt")
        raise FeatInvError(f"{what} hold NaN or Inf values, so no image is returned: likely " + ", or ".join(causes))

    def _check_options(self, steps: int, guidance_scale: float, sampler: str, eta: float, batch_size: int) -> None:
        if sampler not in SAMPLER_LOOPS:
            raise FeatInvError(f"sampler must be one of {', '.join(SAMPLER_LOOPS)}, got {sampler!r}")
        within("batch_size", batch_size, "batch_size")
        within("steps", steps, "steps")
        within("guidance", guidance_scale, "guidance_scale")
        if sampler != "ddim" and eta != 0.0:
            raise FeatInvError(f"eta applies to the ddim sampler only, got eta={eta} with sampler={sampler!r}")
        self.model.noise_schedule.for_sampler(sampler, steps, eta)  # checks steps for the sampler

    @staticmethod
    def _generators(
        n: int, seed: int, first_index: int, generator: torch.Generator | Sequence[torch.Generator] | None
    ) -> torch.Generator | list[torch.Generator]:
        if generator is None:
            if isinstance(first_index, bool) or not isinstance(first_index, int) or first_index < 0:
                raise FeatInvError(f"first_index must be a non-negative integer, got {first_index!r}")
            require_seed("seed", seed, first_index + n)
            return [torch.Generator().manual_seed(seed + first_index + i) for i in range(n)]
        if isinstance(generator, torch.Generator):
            return generator
        generator = list(generator)
        if len(generator) != n:
            raise FeatInvError(f"generator list has {len(generator)} entries, expected one per image ({n})")
        return generator

    def batch_denoiser(
        self, features: torch.Tensor, guidance_scale: float, guidance: str, timesteps: Sequence[int]
    ) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """The denoiser :meth:`reconstruct` samples one batch of feature maps (B, C, h, w) with, over
        the sampler's ``timesteps``: :meth:`guided_denoiser` (a sibling that steers the sampling,
        :class:`featinv.analysis.hybrid.HybridReconstructor`, wraps it here)."""
        if guidance == self.model.guidance:  # (the two-argument call stays what it was)
            return self.guided_denoiser(features, guidance_scale)
        return self.guided_denoiser(features, guidance_scale, guidance)

    def differentiable_denoiser(
        self, features: torch.Tensor, guidance_scale: float, guidance: str | None = None
    ) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """:meth:`guided_denoiser` on the eager path whatever the backend, recording autograd where it
        is on: the (x, t) -> eps to take gradients through (feature guidance of the sampling)."""
        eager = self.denoiser if isinstance(self.denoiser, EagerDenoiser) else EagerDenoiser(self.model)
        return self.guided_denoiser(features, guidance_scale, guidance, denoiser=eager.predict)

    def guided_denoiser(
        self, features: torch.Tensor, guidance_scale: float, guidance: str | None = None, *, denoiser=None
    ) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """The (x, t) -> eps function for a batch of feature maps (B, C, h, w): the hint is computed
        once, both guidance branches run as one batch (``guidance``: what the unconditional branch
        drops, see :meth:`reconstruct`). ``denoiser``: the ``(x, t, hint, context) -> eps`` to run
        instead of the backend's (e.g. one that records gradients). Public for engines and benchmarks."""
        denoiser = denoiser or self.denoiser
        b = features.shape[0]
        features = features.to(self.model.unet.dtype)
        context = self.model.context.expand(b, -1, -1)
        if guidance_scale <= 1.0:
            hint = self.model.controlnet.embed(features)
            return lambda x, t: denoiser(x, t, hint, context)
        # The unconditional branch: the null context with the zero feature map (as featinv trains) or
        # with the same one (as the published sampler guides).
        hint_pair = self.model.guidance_hints(features, guidance)
        context_pair = self.model.guidance_contexts(b)
        return classifier_free_guidance(lambda x, t: denoiser(x, t, hint_pair, context_pair), guidance_scale)
