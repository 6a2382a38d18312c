"""The FeatInv model bundle: frozen base UNet, optional VAE, FeatInv ControlNet, stored contexts,
the feature spec it was trained for, and (optionally) the classifier's weights.

On disk (``save_pretrained``), a folder with no pickle files::

    featinv.json               format version, feature spec, noise schedule, prompt, shapes, and
                               the reference to the base (where it is, its weights' fingerprint)
    controlnet/                diffusers folder: config.json + safetensors
    unet/, vae/                the base's parts, only in a bundled folder (a model made from a
                               preset, or saved with ``bundle=True``); otherwise read from the base
    contexts.safetensors       the conditional and null contexts (B=1, L, D)
    classifier.safetensors     the classifier's weights (optional)

As diffusers' ControlNets do, a model made on a base refers to it instead of copying it (an SD1.x
UNet and VAE are 3.4 GB): many inverters share one base.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from torch import nn

from featinv.errors import FeatInvError
from featinv.features import FeatureExtractor, FeatureSpec
from featinv.files import staged_folder
from featinv.models.base import HAS_ACCELERATE, BaseReference, encode_prompts, load_base, weights_fingerprint
from featinv.models.class_names import check_class_names, read_class_names, write_class_names
from featinv.models.controlnet import FeatInvControlNet
from featinv.models.model_config import (
    CONFIG_NAME,
    FEW_STEP_SAMPLERS,
    FORMAT_VERSION,
    check_guidance,
    read_model_config,
)
from featinv.models.presets import get_preset
from featinv.sampling.schedule import NoiseSchedule
from featinv.weights import load_state_dict, save_diffusers_model, save_state_dict_atomic

DEFAULT_PROMPT = "a high-quality, detailed, and professional image"


def _check_safetensors(path: Path, what: str) -> None:
    """Raise FeatInvError unless ``path`` is a complete safetensors file (header and data size)."""
    if not path.is_file():
        raise FeatInvError(f"{what} is missing: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise FeatInvError(f"{what} {path} is not a valid safetensors file ({error})") from error


def _load_submodel(cls: type, folder: Path, what: str, dtype: torch.dtype | None) -> Any:
    _check_safetensors(folder / "diffusion_pytorch_model.safetensors", f"{what} weights")
    try:
        return cls.from_pretrained(
            str(folder), torch_dtype=dtype, use_safetensors=True, low_cpu_mem_usage=HAS_ACCELERATE
        )
    except Exception as error:  # diffusers raises several types for a bad folder
        raise FeatInvError(f"could not load {what} from {folder}: {error}") from error


class FeatInvModel(nn.Module):
    """A FeatInv model: everything needed to map a feature map back to an image.

    Args:
        unet: the frozen base diffusion UNet.
        controlnet: the FeatInv ControlNet (hint encoder inside).
        feature_spec: the classifier and layer this model was trained for.
        context: (1, L, D) encoder states for the fixed prompt.
        null_context: (1, L, D) encoder states of the unconditional branch.
        noise_schedule: the base model's training schedule.
        vae: the autoencoder of a latent model, or None for a pixel-space model.
        classifier: the classifier, if it is to be stored with the model.
        prompt: the fixed prompt ``context`` encodes (documentation only).
        base: the base's folder or hub id, when the UNet and VAE are its unchanged weights: the
            model folder then refers to it instead of copying them (see :meth:`save_pretrained`).
        base_fingerprint: :func:`featinv.models.base.weights_fingerprint` of that base.
        distillation: for a distilled model (:mod:`featinv.training.distill`), what it was distilled
            with: ``{"method": "consistency", "guidance_scale", "skip"}`` (sampled with the few-step
            ``lcm`` sampler) or ``{"method": "guidance", "guidance_scale"}`` (DPM-Solver++, 4 steps);
            either way without classifier-free guidance (:attr:`few_step_sampler`).
        guidance: what classifier-free guidance guides on by default (:data:`GUIDANCE_MODES`):
            ``"features"`` for the models featinv trains, ``"prompt"`` for a converted published one.
        class_names: the names of the classifier's classes (the folder's ``classifier.json``), or None.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        controlnet: FeatInvControlNet,
        feature_spec: FeatureSpec,
        context: torch.Tensor,
        null_context: torch.Tensor,
        *,
        noise_schedule: NoiseSchedule | None = None,
        vae: AutoencoderKL | None = None,
        classifier: FeatureExtractor | None = None,
        prompt: str | None = None,
        base: str | None = None,
        base_fingerprint: str | None = None,
        distillation: dict[str, Any] | None = None,
        guidance: str = "features",
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if controlnet.config.feature_channels != feature_spec.channels:
            raise FeatInvError(
                f"controlnet expects {controlnet.config.feature_channels} feature channels but the feature spec "
                f"has {feature_spec.channels}"
            )
        if classifier is not None and not classifier.spec.same_source(feature_spec):
            raise FeatInvError(
                f"classifier gives {classifier.spec.describe()}, but the model is for {feature_spec.describe()}"
            )
        self.unet = unet.requires_grad_(False)
        self.controlnet = controlnet
        self.vae = vae.requires_grad_(False) if vae is not None else None
        self.classifier = classifier
        self.feature_spec = feature_spec
        self.noise_schedule = noise_schedule or NoiseSchedule()
        self.prompt = prompt
        self.base, self.base_fingerprint = (base, base_fingerprint) if base is not None else (None, None)
        self.distillation = distillation
        self.guidance = check_guidance(guidance)
        self.class_names = None if class_names is None else check_class_names(class_names)
        self.register_buffer("context", context.detach().clone())
        self.register_buffer("null_context", null_context.detach().clone())

    # ----- shapes -----------------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one diffusion sample."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        return (self.unet.config.in_channels, h, w)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the output images."""
        _, h, w = self.latent_shape
        if self.vae is None:
            return (h, w)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (h * factor, w * factor)

    @property
    def few_step_sampler(self) -> str | None:
        """A distilled model's sampler (``lcm`` after consistency distillation, ``dpmpp`` after
        guidance distillation), or None for a model that is not distilled."""
        return None if self.distillation is None else FEW_STEP_SAMPLERS[self.distillation["method"]]

    def guidance_contexts(self, batch: int) -> torch.Tensor:
        """(2B, L, D): the null context B times, then the stored context B times: the order of the
        two classifier-free-guidance branches (unconditional first) everywhere in featinv."""
        return torch.cat([self.null_context.expand(batch, -1, -1), self.context.expand(batch, -1, -1)])

    def guidance_hints(self, features: torch.Tensor, guidance: str | None = None, embed=None) -> torch.Tensor:
        """(2B, C0, H, W): the hints of the two guidance branches for feature maps (B, C, h, w), in the
        order of :meth:`guidance_contexts`: the zero map's (``guidance="features"``) or the same map's
        (``"prompt"``) B times, then the maps' own. ``guidance`` defaults to the model's; ``embed``
        (default ``controlnet.embed``) lets the fast path use its fused hint encoder."""
        guidance = self.guidance if guidance is None else check_guidance(guidance)
        embed = self.controlnet.embed if embed is None else embed
        if guidance == "prompt":
            hint = embed(features)
            return torch.cat([hint, hint])
        return embed(torch.cat([torch.zeros_like(features), features]))

    # ----- image space <-> diffusion space ----------------------------------------------------
    def decode(self, samples: torch.Tensor, straight_through: bool = False) -> torch.Tensor:
        """Diffusion samples (B, C, H, W) -> images (B, 3, H', W') in [0, 1]. ``straight_through``:
        the [0, 1] clamp passes gradients through unchanged (guided sampling differentiates an
        early, out-of-range estimate too)."""
        if self.vae is not None:
            samples = self.vae.decode(samples / self.vae.config.scaling_factor, return_dict=False)[0]
        images = (samples.float() + 1.0) / 2.0
        if straight_through:
            return images + (images.clamp(0.0, 1.0) - images).detach()
        return images.clamp(0.0, 1.0)

    def predict_noise(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        hint: torch.Tensor,
        conditioning_scale: float = 1.0,
        controlnet: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """eps = UNet(x, t, context, + ControlNet(x, t, context, hint) residuals), in the UNet's dtype.

        Shapes: ``sample`` (B, C, H, W); ``timestep`` a scalar or (B,); ``context`` (B, L, D);
        ``hint`` (B, C0, H, W) from ``controlnet.embed``. Used by inference and training alike;
        training passes its DDP-wrapped ``controlnet``.
        """
        controlnet = self.controlnet if controlnet is None else controlnet
        down, mid = controlnet(sample, timestep, context, hint, conditioning_scale=conditioning_scale)
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=context,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> diffusion samples (the VAE posterior mean for latent models)."""
        x = images * 2.0 - 1.0
        if self.vae is None:
            return x
        return self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean * self.vae.config.scaling_factor

    # ----- building ---------------------------------------------------------------------------
    @classmethod
    def from_preset(
        cls, name: str, extractor: FeatureExtractor, *, seed: int = 0, store_classifier: bool = True, **overrides: Any
    ) -> FeatInvModel:
        """A model with random weights from a preset (``tiny``, ``minisd``, ``sd15``).

        Without a text encoder the stored context is seeded noise and the null context zeros.
        ``overrides`` replace UNet config keys (or ``image_size``/``context_length``/``hint_channels``).
        """
        preset = get_preset(name, **overrides)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**preset.unet_config())
            vae = AutoencoderKL(**preset.vae) if preset.vae is not None else None
            controlnet = FeatInvControlNet.from_unet(unet, extractor.spec.channels, hint_channels=preset.hint_channels)
        generator = torch.Generator().manual_seed(seed)
        dim = unet.config.cross_attention_dim
        context = torch.randn(1, preset.context_length, dim, generator=generator)
        null_context = torch.zeros(1, preset.context_length, dim)
        return cls(
            unet,
            controlnet,
            extractor.spec,
            context,
            null_context,
            vae=vae,
            classifier=extractor if store_classifier else None,
            prompt=None,
        )

    @classmethod
    def from_base(
        cls,
        base: str | Path,
        extractor: FeatureExtractor,
        *,
        prompt: str = DEFAULT_PROMPT,
        hint_channels: int = 512,
        image_size: int | None = None,
        store_classifier: bool = True,
        seed: int = 0,
    ) -> FeatInvModel:
        """A new FeatInv model on a diffusers base (a local folder, or a hub id the user gives).

        The base's text encoder, if it has one, encodes ``prompt`` and the empty prompt once, as
        ``StableDiffusionPipeline.encode_prompt`` does; it is not kept. ``image_size`` (pixels)
        sets the training and output resolution (e.g. 256 for SD1.5, as the paper's miniSD
        setup); default: the base's. The ControlNet copies the base UNet's encoder weights; the
        hint encoder's last convolution starts at zero. The model refers to ``base`` (see
        :meth:`save_pretrained`).
        """
        base = str(base)
        loaded = load_base(base)
        fingerprint = weights_fingerprint(loaded.unet, loaded.vae)
        unet, vae = loaded.unet, loaded.vae
        if image_size is not None:
            unet.register_to_config(sample_size=_latent_side(image_size, vae))
        schedule = NoiseSchedule.from_dict(loaded.scheduler_config) if loaded.scheduler_config else NoiseSchedule()
        contexts = encode_prompts(base, [prompt, ""])
        encoded_prompt = prompt if contexts is not None else None
        dim = unet.config.cross_attention_dim
        stored = Path(base) / "contexts.safetensors"  # the contexts a base without a text encoder was trained with
        if contexts is None and stored.is_file():
            contexts = _read_contexts(stored, dim)
            contexts = [contexts["context"], contexts["null_context"]]
        if contexts is None:
            warnings.warn(
                f"{base} has no text encoder: using a seeded random context and a zero null context", stacklevel=2
            )
            generator = torch.Generator().manual_seed(seed)
            contexts = [torch.randn(1, 77, dim, generator=generator), torch.zeros(1, 77, dim)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            controlnet = FeatInvControlNet.from_unet(unet, extractor.spec.channels, hint_channels=hint_channels)
        return cls(
            unet,
            controlnet,
            extractor.spec,
            contexts[0],
            contexts[1],
            noise_schedule=schedule,
            vae=vae,
            classifier=extractor if store_classifier else None,
            prompt=encoded_prompt,
            base=base,
            base_fingerprint=fingerprint,
        )

    @classmethod
    def from_single_file(
        cls,
        path: str | Path | dict[str, torch.Tensor],
        extractor: FeatureExtractor,
        *,
        config: str | Path | None = None,
        tokenizer: str | Path | None = None,
        text_encoder_config: dict[str, Any] | None = None,
        prompt: str | None = None,
        store_classifier: bool = True,
        dtype: torch.dtype | None = torch.float32,
    ) -> FeatInvModel:
        """The published FeatInv checkpoint (a ControlLDM single file, e.g. the released
        ``control_featinv_convnext_fin.ckpt``, or the state ``published.read_checkpoint`` read from
        one) as a model (diffusers' name for reading one file).

        ``config``: its YAML (default: the published ConvNeXt-B config); ``tokenizer``: a CLIP tokenizer
        folder, needed only for a ``prompt`` other than the published one; ``text_encoder_config``: a
        ``CLIPTextConfig`` dict (default: CLIP ViT-L/14's). The model guides on the prompt
        (``guidance="prompt"``, as the published sampler) and takes images as the published script
        does (shorter side resized to the classifier's input, centre crop: ``crop_pct`` 1). It has no
        base folder until :meth:`save_base` writes one (``featinv convert`` does). ``dtype``: of the
        UNet, VAE and ControlNet; ``None`` keeps the checkpoint's tensors as stored, memory-mapped
        from the file (``featinv convert`` writes them from there, one at a time).
        """
        from dataclasses import replace

        from featinv.models.published import PUBLISHED_PROMPT, read_published

        if extractor.spec.mode != "spatial":
            raise FeatInvError("the published FeatInv model inverts spatial feature maps: give a spatial extractor")
        parts = read_published(
            path,
            extractor.spec.channels,
            config=config,
            tokenizer=tokenizer,
            text_encoder_config=text_encoder_config,
            prompt=PUBLISHED_PROMPT if prompt is None else prompt,
            dtype=dtype,
        )
        model = cls(
            parts.unet,
            parts.controlnet,
            replace(extractor.spec, crop_pct=1.0),  # the caller's extractor is left as it is
            parts.context,
            parts.null_context,
            noise_schedule=parts.noise_schedule,
            vae=parts.vae,
            classifier=extractor if store_classifier else None,
            prompt=parts.prompt,
            guidance="prompt",
        )
        model.text_parts = (parts.text_encoder, parts.tokenizer)  # for save_base: an SD folder has them
        return model.eval()

    # ----- saving and loading -----------------------------------------------------------------
    def save_pretrained(self, path: str | Path, *, bundle: bool = False, dtype: torch.dtype | None = None) -> None:
        """Write the model folder atomically: into a temporary sibling folder, then renamed.

        A model made on a base (``self.base``) refers to it: the folder holds no copy of the base's
        UNet or VAE unless ``bundle`` (a self-contained folder, for offline use). A model without a
        base (from a preset, or one whose UNet was trained) is always bundled. ``dtype``: the
        networks' weights are stored in it (default: as the model holds them), one tensor at a time.
        """
        path = Path(path)
        with _staged_folder(path) as staging:
            reference = None
            if self.base is not None and not bundle:
                reference = BaseReference.to_base(self.base, path, self.base_fingerprint)
            else:
                save_diffusers_model(self.unet, staging / "unet", dtype=dtype)
                if self.vae is not None:
                    save_diffusers_model(self.vae, staging / "vae", dtype=dtype)
            save_diffusers_model(self.controlnet, staging / "controlnet", dtype=dtype)
            save_state_dict_atomic(
                {"context": self.context, "null_context": self.null_context}, staging / "contexts.safetensors"
            )
            if self.classifier is not None:
                save_state_dict_atomic(self.classifier.classifier.state_dict(), staging / "classifier.safetensors")
            config = {
                "format_version": FORMAT_VERSION,
                "feature_spec": self.feature_spec.to_dict(),
                "noise_schedule": self.noise_schedule.to_dict(),
                "prompt": self.prompt,
                "has_vae": self.vae is not None,
                "has_classifier": self.classifier is not None,
                "image_size": list(self.image_size),
                "latent_shape": list(self.latent_shape),
                "base": reference.to_dict() if reference is not None else None,
                "distillation": self.distillation,
                "guidance": self.guidance,
            }
            (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            if self.class_names is not None:
                write_class_names(staging, self.class_names)

    def save_base(
        self, folder: str | Path, *, dtype: torch.dtype | None = None, fingerprint: str | None = None
    ) -> None:
        """Write the model's UNet and VAE as a diffusers base folder (``unet/``, ``vae/``,
        ``scheduler/``, ``model_index.json``, and ``contexts.safetensors``: the contexts the UNet was
        trained with, which :meth:`from_base` gives new models on this base), atomically, and make
        the model refer to it: models saved afterwards (this one, or others given the same base)
        share it instead of copying it. A model read by :meth:`from_single_file` also writes its
        ``text_encoder/`` (and the ``tokenizer/`` it was given): a Stable Diffusion folder.
        ``dtype``: the weights are stored in it (default: as the model holds them); ``fingerprint``:
        their ``weights_fingerprint(unet, vae, stored_as=dtype)`` where the caller has it already
        (reading every weight again to hash it takes seconds at SD1.x size)."""
        folder = Path(folder)
        text_encoder, tokenizer = getattr(self, "text_parts", (None, None))
        with _staged_folder(folder) as staging:
            index = {"_class_name": "FeatInvBase", "unet": ["diffusers", type(self.unet).__name__]}
            save_diffusers_model(self.unet, staging / "unet", dtype=dtype)
            if self.vae is not None:
                save_diffusers_model(self.vae, staging / "vae", dtype=dtype)
                index["vae"] = ["diffusers", type(self.vae).__name__]
            if text_encoder is not None:
                state = None if dtype is None else {k: v.to(dtype) for k, v in text_encoder.state_dict().items()}
                text_encoder.save_pretrained(staging / "text_encoder", safe_serialization=True, state_dict=state)
                index["text_encoder"] = ["transformers", type(text_encoder).__name__]
            if tokenizer is not None:
                tokenizer.save_pretrained(staging / "tokenizer")
                index["tokenizer"] = ["transformers", type(tokenizer).__name__]
            (staging / "scheduler").mkdir()
            scheduler = {"_class_name": "DDIMScheduler", **self.noise_schedule.to_dict()}
            (staging / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
            (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            contexts = {"context": self.context, "null_context": self.null_context}
            save_state_dict_atomic(contexts, staging / "contexts.safetensors")
        self.base = str(folder.resolve())
        self.base_fingerprint = fingerprint or weights_fingerprint(self.unet, self.vae, stored_as=dtype)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: torch.dtype | None = None, trust_code: bool = False
    ) -> FeatInvModel:
        """Load a model folder written by :meth:`save_pretrained` (its base too, when it refers to one).

        A folder whose classifier is a user module (feature spec ``source: module``) imports and
        runs that module: refused unless ``trust_code``.

        Raises:
            FeatInvError: the folder is missing, a file in it is missing, truncated or corrupt, or
                its base is gone or is not the one it was made on.
        """
        path = Path(path)
        if not path.is_dir():
            raise FeatInvError(f"model folder not found: {path}")
        if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise FeatInvError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
        config = read_model_config(path)
        where = str(path / CONFIG_NAME)
        spec = FeatureSpec.from_dict(config["feature_spec"], f"{where}: feature_spec")
        schedule = NoiseSchedule.from_dict(config["noise_schedule"], f"{where}: noise_schedule")
        base, fingerprint = None, None
        if config.get("base") is not None:
            reference = BaseReference.from_dict(config["base"], str(path / CONFIG_NAME))
            loaded = reference.load(path)
            unet, vae = loaded.unet, loaded.vae
            latent = config.get("latent_shape")
            if isinstance(latent, list) and len(latent) == 3:  # the resolution chosen at creation
                unet.register_to_config(sample_size=list(latent[1:]) if latent[1] != latent[2] else latent[1])
            base, fingerprint = reference.locate(path), reference.fingerprint
        else:
            unet = _load_submodel(UNet2DConditionModel, path / "unet", "unet", None)
            vae = _load_submodel(AutoencoderKL, path / "vae", "vae", None) if config.get("has_vae") else None
        controlnet = _load_submodel(FeatInvControlNet, path / "controlnet", "controlnet", None)
        contexts = _read_contexts(path / "contexts.safetensors", unet.config.cross_attention_dim)
        classifier = None
        if config.get("has_classifier"):
            try:
                classifier = FeatureExtractor.from_spec(spec, trust_code=trust_code)
            except FeatInvError as error:  # model_kwargs that do not build: say where they were read
                raise FeatInvError(f"{where}: feature_spec: {error}") from error
            classifier.load_classifier_weights(path / "classifier.safetensors")
        model = cls(
            unet,
            controlnet,
            spec,
            contexts["context"],
            contexts["null_context"],
            noise_schedule=schedule,
            vae=vae,
            classifier=classifier,
            prompt=config.get("prompt"),
            base=base,
            base_fingerprint=fingerprint,
            distillation=config.get("distillation"),
            guidance=config.get("guidance", "features"),
            class_names=read_class_names(path),
        )
        model.eval()
        return model.to(dtype) if dtype is not None else model


DISTILLATION_KEYS = {"consistency": {"method", "guidance_scale", "skip"}, "guidance": {"method", "guidance_scale"}}


@contextmanager
def _staged_folder(target: Path) -> Iterator[Path]:
    """:func:`featinv.files.staged_folder` for a model or base folder, whose parts lose their source
    paths before it replaces ``target``."""
    with staged_folder(target) as staging:
        yield staging
        _drop_source_paths(staging)


def _drop_source_paths(folder: Path) -> None:
    """Remove diffusers' ``_name_or_path`` (where a part was loaded from, often a local path) from the
    part configs: a saved model should not carry the machine's paths it happened to be read from."""
    for config_path in folder.glob("*/config.json"):
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.pop("_name_or_path", None) is not None:
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _read_contexts(file: Path, dim: int) -> dict[str, torch.Tensor]:
    """``context`` and ``null_context`` (1, L, dim) from a safetensors file, checked."""
    _check_safetensors(file, "contexts file")
    contexts = load_state_dict(file, what="contexts")
    if set(contexts) != {"context", "null_context"}:
        raise FeatInvError(f"contexts file {file} must hold context and null_context")
    _check_contexts(contexts, dim, file)
    return contexts


def _check_contexts(contexts: dict[str, torch.Tensor], dim: int, file: Path) -> None:
    """Both contexts (1, L, dim) of one shape, finite: anything else would fail in the UNet or give
    black images."""
    shapes = {name: tuple(tensor.shape) for name, tensor in contexts.items()}
    for name, tensor in contexts.items():
        if tensor.ndim != 3 or tensor.shape[0] != 1 or tensor.shape[2] != dim or tensor.shape[1] < 1:
            raise FeatInvError(f"{file}: {name} has shape {shapes[name]}, expected (1, L, {dim}) for this UNet")
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise FeatInvError(
                f"{file}: {name} holds NaN or Inf values (or is not a float tensor): the file is corrupt"
            )
    if shapes["context"] != shapes["null_context"]:
        raise FeatInvError(f"{file}: context {shapes['context']} and null_context {shapes['null_context']} differ")


def _latent_side(image_size: int, vae: nn.Module | None) -> int:
    """The latent side for ``image_size`` pixels: the VAE's downsampling divides it exactly."""
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise FeatInvError(f"image_size must be a positive integer of pixels, got {image_size!r}")
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    if image_size % factor:
        raise FeatInvError(f"image_size must be a multiple of the VAE's downsampling factor {factor}, got {image_size}")
    return image_size // factor
