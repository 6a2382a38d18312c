"""The published FeatInv checkpoint (AI4HealthUOL/FeatInv: a ControlNet fork on the original LDM
code) read into featinv's parts.

A ``ControlLDM`` single file holds, under these prefixes:

    model.diffusion_model.*     the frozen base UNet (LDM layout)
    control_model.*             the ControlNet; its ``input_hint_block.block.{1,3,5}`` is FeatInv's hint
                                block: bilinear upsample to 32x32, conv 3x3, SiLU, conv 3x3, SiLU, zero conv
    first_stage_model.*         the AutoencoderKL
    cond_stage_model.transformer.*   the CLIP text model of ``FrozenCLIPEmbedder``
    betas, alphas_cumprod, ...  the LDM schedule buffers

diffusers' single-file converters (``diffusers.loaders.single_file_utils``) map the UNet, the
ControlNet body and the VAE; the hint block and the text model's prefix are mapped here. Widths are
read from the tensors (the hint block's is not in the config), and the ControlNet must mirror the
UNet, as the published code builds it. ``tests/test_published.py`` holds the result against the
official code's own outputs (``tests/data/official-reference``).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featinv.errors import FeatInvError
from featinv.files import require_file
from featinv.sampling.schedule import NoiseSchedule

# The published sampler's prompt: the script appends ", " and an empty ``a_prompt`` to its prompt.
PUBLISHED_PROMPT = "a high-quality, detailed, and professional image, "
PUBLISHED_CLASSIFIER = "convnext_base.fb_in22k_ft_in1k"  # timm; its forward_features at 288 px
PUBLISHED_INPUT_SIZE = 288
LATENT_SIZE = (32, 32)  # FeatInvInputHintBlock's target_size: the published code fixes it (256-px images)
HINT_PREFIX = "control_model.input_hint_block.block."
TEXT_PREFIX = "cond_stage_model.transformer."
REQUIRED_PREFIXES = {
    "model.diffusion_model.": "the base UNet",
    "control_model.": "the ControlNet",
    "first_stage_model.": "the autoencoder",
    TEXT_PREFIX: "the CLIP text model",
}

# CLIP ViT-L/14's text model (the published FrozenCLIPEmbedder, openai/clip-vit-large-patch14).
CLIP_VIT_L14_TEXT_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

# The CLIP BPE token ids of the two prompts the published sampler encodes (the official code's own
# tokenizer made them; tests/data/official-reference/reference.json), padded with <|endoftext|> to 77:
# a converted model needs no tokenizer files unless it is given another prompt.
_END = 49407
KNOWN_TOKEN_IDS = {
    PUBLISHED_PROMPT: [49406, 320, 1400, 268, 3027, 267, 12609, 267, 537, 4774, 2867, 267, _END],
    "": [49406, _END],
}

_UNET_PARAMS = {"in_channels", "model_channels", "attention_resolutions", "num_res_blocks", "channel_mult"}
_MIRRORED = ("model_channels", "attention_resolutions", "num_res_blocks", "channel_mult", "num_heads", "context_dim")

# models/cldm_featinv_convnext.yaml of the published code (the ConvNeXt-B final-layer model on miniSD).
_PUBLISHED_UNET = {
    "image_size": 32,
    "in_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "num_heads": 8,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": 768,
    "use_checkpoint": True,
    "legacy": False,
}
PUBLISHED_CONFIG = {
    "model": {
        "target": "cldm.cldm.ControlLDM",
        "params": {
            "linear_start": 0.00085,
            "linear_end": 0.0120,
            "timesteps": 1000,
            "image_size": 64,
            "channels": 4,
            "scale_factor": 0.18215,
            "control_stage_config": {
                "target": "cldm.cldm.ControlNet",
                "params": {**_PUBLISHED_UNET, "hint_channels": 1024},
            },
            "unet_config": {
                "target": "cldm.cldm.ControlledUnetModel",
                "params": {**_PUBLISHED_UNET, "out_channels": 4},
            },
            "first_stage_config": {
                "target": "ldm.models.autoencoder.AutoencoderKL",
                "params": {
                    "embed_dim": 4,
                    "ddconfig": {
                        "double_z": True,
                        "z_channels": 4,
                        "resolution": 256,
                        "in_channels": 3,
                        "out_ch": 3,
                        "ch": 128,
                        "ch_mult": [1, 2, 4, 4],
                        "num_res_blocks": 2,
                        "attn_resolutions": [],
                        "dropout": 0.0,
                    },
                },
            },
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
        },
    }
}


def read_config(path: str | Path | None) -> dict[str, Any]:
    """A ControlLDM config in the published YAML form (default: the published ConvNeXt-B one),
    read with ``yaml.safe_load`` (no code runs) and its parts checked."""
    if path is None:
        return json.loads(json.dumps(PUBLISHED_CONFIG))
    import yaml

    path = require_file(path, "--config")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise FeatInvError(f"--config {path} is not valid YAML ({str(error).splitlines()[0]})") from error
    params = config.get("model", {}).get("params") if isinstance(config, dict) else None
    if not isinstance(params, dict):
        raise FeatInvError(f"--config {path} has no model.params: not a ControlLDM config")
    for part in ("unet_config", "control_stage_config", "first_stage_config"):
        if not isinstance(params.get(part), dict) or not isinstance(params[part].get("params"), dict):
            raise FeatInvError(f"--config {path} has no model.params.{part}.params: not a ControlLDM config")
    unet = params["unet_config"]["params"]
    if missing := sorted(_UNET_PARAMS - set(unet)):
        raise FeatInvError(f"--config {path}: unet_config.params lacks {', '.join(missing)}")
    if "ddconfig" not in params["first_stage_config"]["params"]:
        raise FeatInvError(f"--config {path}: first_stage_config.params lacks ddconfig")
    control = params["control_stage_config"]["params"]
    for key in _MIRRORED:
        if control.get(key) != unet.get(key):
            raise FeatInvError(
                f"--config {path}: the ControlNet's {key} ({control.get(key)!r}) differs from the UNet's "
                f"({unet.get(key)!r}); a ControlNet mirrors its UNet's encoder"
            )
    schedule = params.get("beta_schedule", "linear")
    if schedule != "linear" or params.get("parameterization", "eps") != "eps":
        raise FeatInvError(
            f"--config {path}: beta_schedule {schedule!r} / parameterization {params.get('parameterization')!r}; "
            "featinv reads the published 'linear' eps models"
        )
    return config


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a ControlLDM single file (``.ckpt``/``.pt``/``.pth`` through
    ``torch.load(weights_only=True)``, ``{"state_dict": ...}`` or bare, or ``.safetensors``),
    checked to be one; its floating-point tensors as stored (float16 in the released file), and
    memory-mapped where the file's format allows: nothing is copied until it is used."""
    from featinv.weights import load_state_dict

    path = require_file(path, "--checkpoint")
    state = load_state_dict(path, what="checkpoint", mmap=True)
    missing = [what for prefix, what in REQUIRED_PREFIXES.items() if not any(k.startswith(prefix) for k in state)]
    hint = [f"{HINT_PREFIX}{i}.{kind}" for i in (1, 3, 5) for kind in ("weight", "bias")]
    if missing:
        raise FeatInvError(
            f"--checkpoint {path} is not a ControlLDM checkpoint of the published layout: it lacks "
            + ", ".join(missing)
            + f" ({', '.join(p + '*' for p in REQUIRED_PREFIXES)})"
        )
    if absent := [key for key in hint if key not in state]:
        raise FeatInvError(
            f"--checkpoint {path} has no FeatInv hint block: {absent[0]} is missing (a plain ControlNet's "
            "input_hint_block is not FeatInv's)"
        )
    weights = [k for prefix in REQUIRED_PREFIXES for k in state if k.startswith(prefix) and "position_ids" not in k]
    if not all(state[k].is_floating_point() for k in weights):
        raise FeatInvError(f"--checkpoint {path} holds integer tensors where weights should be")
    return {k: v for k, v in state.items() if v.is_floating_point()}  # counters and ids dropped


@dataclass(frozen=True)
class Footprint:
    """What converting a checkpoint takes, in bytes (``featinv convert`` checks it before writing).

    Attributes:
        memory: the checkpoint's tensors as stored (mapped, and read while the folders are written),
            the text encoder in float32 (it encodes the prompts), two copies of the largest tensor
            (one tensor is converted at a time) and a margin for the rest.
        model: the model folder's weights (the ControlNet) in the output dtype.
        base: the base folder's (UNet, VAE, text encoder) in the output dtype.
    """

    memory: int
    model: int
    base: int


MEMORY_MARGIN = 256 * 2**20  # prompts, configs, the writers' buffers


def footprint(state: dict[str, torch.Tensor], dtype: torch.dtype) -> Footprint:
    """The :class:`Footprint` of converting ``state`` (from :func:`read_checkpoint`) into ``dtype``."""

    def numel(*prefixes: str) -> int:
        return sum(v.numel() for k, v in state.items() if k.startswith(prefixes))

    stored = sum(v.numel() * v.element_size() for v in state.values())
    largest = max(v.numel() for v in state.values()) * max(4, dtype.itemsize)
    text = numel(TEXT_PREFIX)
    base = numel("model.diffusion_model.", "first_stage_model.", TEXT_PREFIX) * dtype.itemsize
    return Footprint(stored + text * 4 + 2 * largest + MEMORY_MARGIN, numel("control_model.") * dtype.itemsize, base)


def hint_widths(state: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(feature channels, hidden width, ControlNet width) of the hint block, from its tensors."""
    first, last = state[HINT_PREFIX + "1.weight"], state[HINT_PREFIX + "5.weight"]
    if first.ndim != 4 or last.ndim != 4 or state[HINT_PREFIX + "3.weight"].shape[:2] != (first.shape[0],) * 2:
        raise FeatInvError("the checkpoint's hint block is not three 3x3 convolutions of matching widths")
    return int(first.shape[1]), int(first.shape[0]), int(last.shape[0])


@dataclass
class PublishedParts:
    """What a ControlLDM single file converts to: diffusers/transformers modules and the rest.

    Attributes:
        unet, vae, controlnet: the frozen base UNet and VAE, the FeatInv ControlNet (hint encoder in it).
        text_encoder: the CLIP text model (written into the base folder, not kept by the model).
        tokenizer: the CLIP tokenizer given, or None (the known prompts' token ids then serve).
        noise_schedule: the LDM training schedule.
        context, null_context: (1, 77, D) states of the prompt and of the empty prompt.
        prompt: the prompt ``context`` encodes.
    """

    unet: nn.Module
    vae: nn.Module
    controlnet: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    noise_schedule: NoiseSchedule
    context: torch.Tensor
    null_context: torch.Tensor
    prompt: str


def _load(module: nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    """Load ``weights`` into ``module`` strictly; a mismatch is one FeatInvError naming ``what``.
    A module built on the meta device (no weights of its own) takes the tensors themselves."""
    on_meta = any(t.is_meta for t in module.state_dict().values())
    try:
        module.load_state_dict(weights, strict=True, assign=on_meta)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise FeatInvError(f"the checkpoint's {what} does not fit its config: {detail}") from error
    assert not any(t.is_meta for t in (*module.parameters(), *module.buffers())), f"{what}: a tensor left unloaded"


def noise_schedule(config: dict[str, Any], state: dict[str, torch.Tensor]) -> NoiseSchedule:
    """The LDM ``linear`` schedule (diffusers' ``scaled_linear``: betas linear in sqrt), checked
    against the checkpoint's own ``alphas_cumprod`` where it has one (stored in fp16 or fp32)."""
    params = config["model"]["params"]
    schedule = NoiseSchedule.from_dict(
        {
            "num_train_timesteps": params.get("timesteps", 1000),
            "beta_start": params.get("linear_start", 0.00085),
            "beta_end": params.get("linear_end", 0.012),
            "beta_schedule": "scaled_linear",
            "set_alpha_to_one": False,
            "steps_offset": 1,
            "timestep_spacing": "leading",
        },
        "the config's schedule",
    )
    stored = state.get("alphas_cumprod")
    if stored is not None:
        expected = torch.tensor(schedule.alphas_cumprod(), dtype=torch.float64)
        if stored.shape != expected.shape or not torch.allclose(stored.double(), expected, rtol=2e-3, atol=1e-5):
            raise FeatInvError(
                "the checkpoint's alphas_cumprod do not follow its config's schedule (timesteps, linear_start, "
                "linear_end): give the --config it was trained with"
            )
    return schedule


def _text_encoder(state: dict[str, torch.Tensor], config: dict[str, Any] | None) -> nn.Module:
    """The CLIP text model, its keys with or without transformers 4's ``text_model.`` level."""
    from transformers import CLIPTextConfig, CLIPTextModel

    try:
        encoder = CLIPTextModel(CLIPTextConfig(**(config or CLIP_VIT_L14_TEXT_CONFIG))).eval()
    except (TypeError, ValueError) as error:
        raise FeatInvError(f"--text-encoder-config is not a CLIPTextConfig: {error}") from error
    weights = {k[len(TEXT_PREFIX) :]: v for k, v in state.items() if k.startswith(TEXT_PREFIX)}
    weights = {k.removeprefix("text_model."): v for k, v in weights.items() if not k.endswith("position_ids")}
    if any(k.startswith("text_model.") for k in encoder.state_dict()):  # transformers 4's layout
        weights = {f"text_model.{k}": v for k, v in weights.items()}
    buffers = {k for k, _ in encoder.named_buffers()}
    weights.update({k: v for k, v in encoder.state_dict().items() if k in buffers and k not in weights})
    _load(encoder, weights, "text encoder (check --text-encoder-config)")
    return encoder


def encode_prompts(encoder: nn.Module, tokenizer: Any, prompts: list[str]) -> list[torch.Tensor]:
    """Each prompt's (1, 77, D) last hidden states, as ``FrozenCLIPEmbedder`` computes them (padded
    to 77 tokens, no attention mask); without a tokenizer only the known prompts can be encoded."""
    length = int(encoder.config.max_position_embeddings)
    if tokenizer is not None:
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        ids = ids.input_ids
    else:
        unknown = [p for p in prompts if p not in KNOWN_TOKEN_IDS]
        if unknown:
            raise FeatInvError(
                f"the prompt {unknown[0]!r} needs a CLIP tokenizer to encode: give --tokenizer DIR (an SD folder's "
                f"tokenizer/), or keep the published prompt {PUBLISHED_PROMPT!r}"
            )
        ids = torch.tensor([(KNOWN_TOKEN_IDS[p] + [_END] * length)[:length] for p in prompts])
    if int(ids.max()) >= encoder.config.vocab_size:
        raise FeatInvError(f"the tokenizer's ids reach {int(ids.max())}, past the text encoder's vocabulary")
    with torch.no_grad():
        states = encoder(ids)[0]
    return [states[i : i + 1].clone() for i in range(len(prompts))]


def read_published(
    checkpoint: str | Path | dict[str, torch.Tensor],
    feature_channels: int,
    *,
    config: str | Path | dict[str, Any] | None = None,
    tokenizer: str | Path | None = None,
    text_encoder_config: dict[str, Any] | None = None,
    prompt: str = PUBLISHED_PROMPT,
    dtype: torch.dtype | None = torch.float32,
) -> PublishedParts:
    """Convert a ControlLDM single file (or the state :func:`read_checkpoint` read from one) for a
    classifier whose maps have ``feature_channels``.

    The UNet, VAE and ControlNet are built without weights (on the meta device) and take the
    checkpoint's tensors themselves: in ``dtype``, or with ``dtype=None`` as stored (then they are
    the memory-mapped file: no copy is made, which is how ``featinv convert`` streams a 1.4 G-parameter
    checkpoint into its folders). The text encoder runs here, in float32, to encode the prompts.

    Raises:
        FeatInvError: the file is not such a checkpoint (layout, truncated, pickled code), does not
            fit ``config``, or its hint block takes another number of channels than the classifier gives.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as converters

    from featinv.models.controlnet import FeatInvControlNet

    try:
        import transformers  # noqa: F401 - the text encoder's library
    except ImportError as error:
        raise FeatInvError("reading the published checkpoint needs transformers: pip install 'featinv[sd]'") from error
    config = config if isinstance(config, dict) else read_config(config)
    loaded_tokenizer = None
    if tokenizer is not None:
        loaded_tokenizer = _tokenizer(tokenizer)
    state = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    channels, hidden, width = hint_widths(state)
    if channels != feature_channels:
        raise FeatInvError(
            f"the checkpoint's hint block takes {channels}-channel feature maps, but the classifier gives "
            f"{feature_channels} channels: give the --classifier (and --layer) it was trained on"
        )
    schedule = noise_schedule(config, state)
    with warnings.catch_warnings():  # diffusers deprecates passing image_size; it is overridden below
        warnings.simplefilter("ignore")
        try:
            unet_config = converters.create_unet_diffusers_config_from_ldm(config, state, image_size=256)
            vae_config = converters.create_vae_diffusers_config_from_ldm(config, state, image_size=256)
            unet_weights = converters.convert_ldm_unet_checkpoint(state, unet_config)
            vae_weights = converters.convert_ldm_vae_checkpoint(state, vae_config)
            control_weights = converters.convert_controlnet_checkpoint(state, unet_config)
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise FeatInvError(f"the checkpoint does not fit its config ({type(error).__name__}: {error})") from error
    unet_config["sample_size"] = LATENT_SIZE[0]
    vae_config["sample_size"] = LATENT_SIZE[0] * 2 ** (len(vae_config["block_out_channels"]) - 1)
    if width != unet_config["block_out_channels"][0]:
        raise FeatInvError(
            f"the checkpoint's hint block ends at {width} channels, its UNet starts at "
            f"{unet_config['block_out_channels'][0]}"
        )
    with torch.device("meta"):  # the modules' shapes only: the checkpoint's tensors become their weights
        unet, vae = UNet2DConditionModel(**unet_config), AutoencoderKL(**vae_config)
        controlnet = FeatInvControlNet.from_unet(unet, channels, hint_channels=hidden)
    _load(unet, unet_weights, "UNet")
    _load(vae, vae_weights, "autoencoder")
    body = {k: v for k, v in control_weights.items() if not k.startswith("controlnet_cond_embedding.")}
    _load(controlnet.controlnet, body, "ControlNet")
    hint = {
        f"{name}.{kind}": state[f"{HINT_PREFIX}{index}.{kind}"]
        for name, index in (("conv_in", 1), ("conv_mid", 3), ("conv_out", 5))
        for kind in ("weight", "bias")
    }
    _load(controlnet.hint_encoder, hint, "hint block")
    encoder = _text_encoder(state, text_encoder_config)
    if encoder.config.hidden_size != unet.config.cross_attention_dim:
        raise FeatInvError(
            f"the text encoder is {encoder.config.hidden_size} wide, the UNet's context "
            f"{unet.config.cross_attention_dim}: check --text-encoder-config"
        )
    context, null_context = encode_prompts(encoder, loaded_tokenizer, [prompt, ""])
    if dtype is not None:
        unet, vae, controlnet = unet.to(dtype), vae.to(dtype), controlnet.to(dtype)
    return PublishedParts(
        unet.eval(), vae.eval(), controlnet.eval(), encoder, loaded_tokenizer, schedule, context, null_context, prompt
    )


def _tokenizer(folder: str | Path) -> Any:
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise FeatInvError(
            f"--tokenizer {folder} is not a folder (give a CLIP tokenizer folder, an SD folder's tokenizer/)"
        )
    try:
        return CLIPTokenizer.from_pretrained(str(folder))
    except Exception as error:  # transformers raises many types for a bad folder
        raise FeatInvError(f"--tokenizer {folder} is not a CLIP tokenizer folder ({error})") from error
