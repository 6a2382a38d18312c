"""The model folder's ``featinv.json``: its format version and its top-level fields, checked on
read (the feature spec and the noise schedule are checked by their own ``from_dict``), and the
names those fields take (guidance modes, distillation records)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from featinv.choices import GUIDANCE_MODES
from featinv.errors import FeatInvError
from featinv.files import read_json_object
from featinv.limits import LIMITS

FORMAT_VERSION = 1
CONFIG_NAME = "featinv.json"


def check_guidance(guidance: Any) -> str:
    """``guidance`` if it is one of :data:`GUIDANCE_MODES`; a FeatInvError naming it otherwise."""
    if guidance not in GUIDANCE_MODES:
        raise FeatInvError(f"guidance must be one of {', '.join(GUIDANCE_MODES)}, got {guidance!r}")
    return guidance


def read_model_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``featinv.json`` of a model folder, its top-level fields checked (the feature spec
    and the noise schedule are checked by their own ``from_dict``)."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FeatInvError(f"{path} is not a featinv model folder: {CONFIG_NAME} is missing")
    config = read_json_object(file)
    missing = [k for k in ("format_version", "feature_spec", "noise_schedule") if k not in config]
    if missing:
        raise FeatInvError(f"{file} lacks {', '.join(missing)}")
    if config["format_version"] != FORMAT_VERSION:
        raise FeatInvError(f"{file} has format_version {config['format_version']!r}, expected {FORMAT_VERSION}")
    checks = {
        "prompt": (lambda v: v is None or isinstance(v, str), "a string or null"),
        "has_vae": (lambda v: isinstance(v, bool), "true or false"),
        "has_classifier": (lambda v: isinstance(v, bool), "true or false"),
        "image_size": (lambda v: _int_list(v, 2), "[H, W] of positive integers"),
        "latent_shape": (lambda v: _int_list(v, 3), "[C, H, W] of positive integers"),
        "distillation": (
            _is_distillation,
            'null, {"method": "consistency", "guidance_scale": a number in [1, 50], "skip": a positive integer} '
            'or {"method": "guidance", "guidance_scale": a number in [1, 50]}',
        ),
        "guidance": (lambda v: v in GUIDANCE_MODES, " or ".join(map(repr, GUIDANCE_MODES))),
    }
    for key, (ok, expected) in checks.items():
        if key in config and not ok(config[key]):
            raise FeatInvError(f"{file}: {key} must be {expected}, got {config[key]!r}")
    return config


DISTILLATION_KEYS = {"consistency": {"method", "guidance_scale", "skip"}, "guidance": {"method", "guidance_scale"}}


FEW_STEP_SAMPLERS = {"consistency": "lcm", "guidance": "dpmpp"}  # a distilled model's sampler, by method


def _is_distillation(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, dict) or set(value) != DISTILLATION_KEYS.get(value.get("method"), ()):
        return False
    scale, skip = value["guidance_scale"], value.get("skip", 1)
    return (
        LIMITS["distill_guidance"].accepts(scale)
        and isinstance(skip, int)
        and not isinstance(skip, bool)
        and 1 <= skip <= 1000
    )


def _int_list(value: Any, length: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == length
        and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1 << 16 for v in value)
    )
