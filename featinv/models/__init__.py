"""FeatInv models: the hint encoder, the FeatInv ControlNet, the model bundle and presets."""

from featinv.models.controlnet import FeatInvControlNet
from featinv.models.featinv_model import DEFAULT_PROMPT, FeatInvModel
from featinv.models.hint_encoder import HintEncoder
from featinv.models.presets import PRESETS, get_preset

__all__ = ["DEFAULT_PROMPT", "PRESETS", "FeatInvControlNet", "FeatInvModel", "HintEncoder", "get_preset"]
