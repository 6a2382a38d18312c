"""The frozen base of a FeatInv model: a diffusers folder (or a hub id the user gives) with
``unet/``, and as a Stable Diffusion folder has them ``vae/``, ``text_encoder/`` + ``tokenizer/``
and ``scheduler/``.

Loading checks what a broken folder would otherwise turn into a traceback later (a missing
tokenizer, a missing or truncated VAE that ``model_index.json`` lists, a UNet whose channels fit
neither the VAE's latents nor RGB). Weights are read as safetensors where present; a pickle
``.bin`` only through diffusers' ``torch.load(weights_only=True)``.

A FeatInv model refers to its base by :class:`BaseReference`: where it is, and a fingerprint of
its UNet and VAE weights, checked when the model is loaded.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featinv.errors import FeatInvError
from featinv.files import read_json_object
from featinv.weights import update_digest

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
HAS_ACCELERATE = __import__("importlib").util.find_spec("accelerate") is not None


def named_base(base: str | Path, read_from: str | Path | None = None) -> str:
    """How a message names a base: ``--base X`` as the user gave it, or ``the base X (read from
    M/featinv.json)`` for the one a model folder refers to."""
    return f"--base {base}" if read_from is None else f"the base {base} (read from {read_from})"


def base_kind(base: str | Path, read_from: str | Path | None = None) -> str:
    """``"folder"`` or ``"hub"`` for a ``--base`` value (or a base a model's ``featinv.json``,
    ``read_from``, names); FeatInvError when it is neither."""
    text = str(base)
    path = Path(text).expanduser()
    if path.is_dir():
        return "folder"
    if path.exists():
        raise FeatInvError(f"{named_base(text, read_from)} is a file; give a diffusers folder (with unet/) or a hub id")
    looks_local = text.startswith((".", "/", "~")) or os.sep in text.strip("/").split("/", 1)[-1]
    if HUB_ID.fullmatch(text) and not looks_local:
        return "hub"
    raise FeatInvError(
        f"{named_base(repr(text), read_from)} is neither a folder (nothing at {path.resolve()}) nor a hub id of the "
        "form owner/name"
    )


def _components(folder: Path) -> dict[str, Any]:
    """``model_index.json``'s parts that are present (``[library, class]`` with a class), or {}."""
    index = folder / "model_index.json"
    if not index.is_file():
        return {}
    data = read_json_object(index)
    return {k: v for k, v in data.items() if isinstance(v, list) and len(v) == 2 and v[1] is not None}


def _check_weights_file(folder: Path, what: str) -> bool:
    """Whether ``folder`` holds safetensors weights (True) or only a ``.bin`` (False); FeatInvError
    when it holds neither or the safetensors file is truncated or corrupt."""
    from safetensors import safe_open

    if not (folder / "config.json").is_file():
        raise FeatInvError(f"the base's {what} is missing or incomplete: no {folder / 'config.json'}")
    safetensors_file = folder / WEIGHT_FILES[0]
    if safetensors_file.is_file():
        try:
            with safe_open(str(safetensors_file), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # safetensors raises its own types for a bad header
            raise FeatInvError(
                f"the base's {what} weights {safetensors_file} are truncated or corrupt ({error})"
            ) from error
        return True
    if (folder / WEIGHT_FILES[1]).is_file():
        return False
    raise FeatInvError(f"the base's {what} has no weights: neither {WEIGHT_FILES[0]} nor {WEIGHT_FILES[1]} in {folder}")


def load_part(cls: type, base: str, subfolder: str, what: str) -> Any:
    """One diffusers model of the base (``unet``, ``vae``), safetensors preferred."""
    local = Path(base).expanduser()
    kwargs: dict[str, Any] = {"subfolder": subfolder, "low_cpu_mem_usage": HAS_ACCELERATE}
    if local.is_dir():
        kwargs["use_safetensors"] = _check_weights_file(local / subfolder, what)
        base = str(local)
    try:
        return cls.from_pretrained(base, **kwargs)
    except FeatInvError:
        raise
    except Exception as error:  # diffusers raises many types for a bad part
        raise FeatInvError(f"could not load the base's {what} from {base}/{subfolder}: {error}") from error


@dataclass
class LoadedBase:
    """The parts of a base a FeatInv model keeps (UNet, VAE or None) and its noise-schedule config."""

    unet: nn.Module
    vae: nn.Module | None
    scheduler_config: dict[str, Any] | None


def load_base(base: str | Path, read_from: str | Path | None = None) -> LoadedBase:
    """Load and check a base's UNet, VAE and scheduler config (``read_from``: the ``featinv.json``
    that names it, for the messages).

    Raises:
        FeatInvError: naming what is missing or does not fit.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    base = str(base)
    kind = base_kind(base, read_from)
    folder = Path(base).expanduser()
    components = _components(folder) if kind == "folder" else {}
    if kind == "folder" and not (folder / "unet").is_dir():
        raise FeatInvError(f"{named_base(base, read_from)} has no unet/ folder: not a diffusers base")
    unet = load_part(UNet2DConditionModel, base, "unet", "unet")
    vae = None
    wants_vae = "vae" in components or (kind == "folder" and (folder / "vae").exists())
    if wants_vae:
        if not (folder / "vae").is_dir():
            raise FeatInvError(f"{folder / 'model_index.json'} lists a vae, but {folder / 'vae'} is missing")
        vae = load_part(AutoencoderKL, base, "vae", "vae")
    elif kind == "hub":
        vae = _maybe_hub_part(AutoencoderKL, base, "vae")
    expected = vae.config.latent_channels if vae is not None else 3
    space = f"the VAE's {expected} latent channels" if vae is not None else "RGB (3 channels, no VAE)"
    for key in ("in_channels", "out_channels"):
        if unet.config[key] != expected:
            raise FeatInvError(f"the base's unet has {key}={unet.config[key]}, which does not fit {space}")
    scheduler_config = None
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    if kind == "folder" and scheduler_file.is_file():
        scheduler_config = read_json_object(scheduler_file)
    elif kind == "hub":
        scheduler_config = _maybe_hub_scheduler(base)
    return LoadedBase(unet, vae, scheduler_config)


def _maybe_hub_part(cls: type, base: str, subfolder: str) -> Any:
    try:
        return cls.from_pretrained(base, subfolder=subfolder)
    except (OSError, ValueError):
        return None


def _maybe_hub_scheduler(base: str) -> dict[str, Any] | None:
    from diffusers import DDIMScheduler

    try:
        return dict(DDIMScheduler.load_config(base, subfolder="scheduler"))
    except (OSError, ValueError):
        return None


def encode_prompts(base: str | Path, prompts: list[str]) -> list[torch.Tensor] | None:
    """Each prompt's (1, L, D) text-encoder states, as ``StableDiffusionPipeline.encode_prompt``
    computes them (padded to the tokenizer's length, no attention mask unless the encoder asks);
    None when the base has no text encoder."""
    base = str(base)
    folder = Path(base).expanduser()
    if base_kind(base) == "folder":
        components = _components(folder)
        if "text_encoder" not in components and not (folder / "text_encoder").exists():
            return None
        if not (folder / "tokenizer").is_dir():
            from featinv.models.published import KNOWN_TOKEN_IDS

            if all(prompt in KNOWN_TOKEN_IDS for prompt in prompts):  # e.g. a converted published base
                return _encode_known(folder, prompts)
            raise FeatInvError(
                f"--base {base} has a text encoder but no tokenizer/ folder: copy the tokenizer of its model "
                "(vocab.json, merges.txt, ...) into it"
            )
        base = str(folder)
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as error:
        raise FeatInvError(
            f"{base} has a text encoder; encoding the fixed prompt needs transformers: pip install 'featinv[sd]'"
        ) from error
    try:
        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
        encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", use_safetensors=None).eval()
    except Exception as error:  # transformers raises many types for a bad folder
        raise FeatInvError(f"could not load the base's tokenizer and text encoder from {base}: {error}") from error
    length = min(int(tokenizer.model_max_length), int(encoder.config.max_position_embeddings))
    with torch.no_grad():
        tokens = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        use_mask = getattr(encoder.config, "use_attention_mask", False)
        mask = tokens.attention_mask if use_mask else None
        states = encoder(tokens.input_ids, attention_mask=mask)[0]
    return [states[i : i + 1] for i in range(len(prompts))]


def _encode_known(folder: Path, prompts: list[str]) -> list[torch.Tensor]:
    """The prompts whose CLIP token ids featinv knows (the published FeatInv prompt, the empty one),
    encoded by the folder's text encoder without a tokenizer."""
    from transformers import CLIPTextModel

    from featinv.models.published import encode_prompts as encode_known

    try:
        encoder = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder").eval()
    except Exception as error:  # transformers raises many types for a bad folder
        raise FeatInvError(f"could not load the base's text encoder from {folder}: {error}") from error
    return encode_known(encoder, None, prompts)


def weights_fingerprint(*modules: nn.Module | None, stored_as: torch.dtype | None = None) -> str:
    """sha256 over the names, shapes, dtypes and bytes (in logical order) of the modules' state as
    :func:`load_base` loads it back (in float32, as diffusers loads any file) once saved in
    ``stored_as`` (default: as the modules hold it). A float32 model's fingerprint is of its bytes."""
    digest = hashlib.sha256()
    for index, module in enumerate(modules):
        if module is not None:
            update_digest(digest, str(index), module.state_dict(), stored_as=stored_as or torch.float32)
    return digest.hexdigest()


def folder_fingerprint(folder: str | Path) -> str | None:
    """:func:`weights_fingerprint` of the UNet and VAE that :func:`load_base` would load from a base
    folder, read one tensor at a time from their safetensors files instead of loading the models
    (a base of an SD1.x size is 3.8 GB in float32). None where the files are not plainly the models'
    state (no safetensors file, other names): then load the base to know."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from featinv.weights import iter_safetensors, read_safetensors_header

    folder = Path(folder)
    digest = hashlib.sha256()
    for index, (cls, part) in enumerate(((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"))):
        if part == "vae" and not (folder / part).exists() and "vae" not in _components(folder):
            continue
        weights = folder / part / WEIGHT_FILES[0]
        if not weights.is_file() or not (folder / part / "config.json").is_file():
            return None
        try:
            with torch.device("meta"):  # the state's names in the model's order, no weights made
                names = list(cls.from_config(cls.load_config(str(folder / part))).state_dict())
            if sorted(read_safetensors_header(weights)[0]) != sorted(names):
                return None
            tensors = iter_safetensors(weights, names)
            update_digest(digest, str(index), tensors, stored_as=torch.float32)  # diffusers loads float32
        except Exception:  # a config or file diffusers would refuse too: load_base says why
            return None
    return digest.hexdigest()


@dataclass(frozen=True)
class BaseReference:
    """Where a FeatInv model's frozen base is and what it must be.

    Attributes:
        source: a hub id, or the base folder as an absolute path.
        relative: for a folder, its path relative to the model folder (tried first, so a model
            and its base can move together), else None.
        fingerprint: :func:`weights_fingerprint` of the base's UNet and VAE.
    """

    source: str
    relative: str | None
    fingerprint: str

    @classmethod
    def to_base(cls, base: str | Path, model_folder: str | Path, fingerprint: str) -> BaseReference:
        if base_kind(base) == "hub":
            return cls(str(base), None, fingerprint)
        folder = Path(base).expanduser().resolve()
        return cls(str(folder), os.path.relpath(folder, Path(model_folder).resolve()), fingerprint)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "relative": self.relative, "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> BaseReference:
        if not isinstance(data, dict) or not isinstance(data.get("source"), str) or not data["source"]:
            raise FeatInvError(f"{where}: 'base' must be an object with a non-empty 'source', got {data!r}")
        relative, fingerprint = data.get("relative"), data.get("fingerprint")
        if relative is not None and not isinstance(relative, str):
            raise FeatInvError(f"{where}: base 'relative' must be a string or null, got {relative!r}")
        if not isinstance(fingerprint, str) or not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
            raise FeatInvError(f"{where}: base 'fingerprint' must be 64 hex digits, got {fingerprint!r}")
        return cls(data["source"], relative, fingerprint)

    def locate(self, model_folder: str | Path) -> str:
        """The base's folder (the relative path first) or hub id; FeatInvError when it is gone."""
        if self.relative is not None:
            beside = Path(model_folder) / self.relative
            if beside.is_dir():
                return str(beside.resolve())
            if Path(self.source).is_dir():
                return self.source
            raise FeatInvError(
                f"the base of model {model_folder} is not found: neither {beside} nor {self.source} exists "
                "(move the base back, or re-create the model with --bundle to copy the base in)"
            )
        return self.source

    def load(self, model_folder: str | Path) -> LoadedBase:
        """Load the base and check its fingerprint."""
        where = self.locate(model_folder)
        loaded = load_base(where, read_from=Path(model_folder) / "featinv.json")
        found = weights_fingerprint(loaded.unet, loaded.vae)
        if found != self.fingerprint:
            raise FeatInvError(
                f"the base at {where} is not the one model {model_folder} was made on: its weights' fingerprint is "
                f"{found[:16]}..., the model expects {self.fingerprint[:16]}... (restore that base, or re-create the "
                "model on this one)"
            )
        return loaded
