"""A model from any training checkpoint, not only the run's end: ``featinv train`` keeps
``OUT/checkpoints/step-NNNNNNN/`` folders (:mod:`featinv.training.checkpoint`) holding the trained
module's weights and, with ``--ema``, their moving average; a checkpoint chosen on validation
images is loaded into the model it was trained from and saved as a model folder."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from featinv.errors import FeatInvError
from featinv.training.checkpoint import Checkpoint
from featinv.training.loop import ema_shadow

if TYPE_CHECKING:
    from featinv.models import FeatInvModel

# The module each stage's checkpoint holds, as an attribute path on the FeatInvModel.
STAGE_MODULES = {"controlnet": "controlnet", "transfer": "controlnet.hint_encoder", "base": "unet"}


def load_checkpoint_into(model: FeatInvModel, checkpoint: Checkpoint, *, ema: bool = True) -> str:
    """Set ``model``'s trained module to the checkpoint's weights, in place: the moving average
    when the run kept one and ``ema``, the raw weights otherwise. Returns which ("ema" or "raw").

    Raises:
        FeatInvError: the checkpoint is of another stage (a distillation, a classifier) or of a
            module shaped unlike this model's.
    """
    stage = checkpoint.state.get("stage")
    if stage not in STAGE_MODULES:
        raise FeatInvError(
            f"the checkpoint {checkpoint.path} is of stage {stage!r}: a model can be made from the "
            f"{', '.join(STAGE_MODULES)} stages of 'featinv train'"
        )
    module = model
    for name in STAGE_MODULES[stage].split("."):
        module = getattr(module, name)
    weights = checkpoint.tensors["model"]
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if {k: tuple(v.shape) for k, v in weights.items()} != expected:
        raise FeatInvError(
            f"the checkpoint {checkpoint.path} holds a {stage} shaped unlike this model's: give --model the "
            "folder the run trained (its --model)"
        )
    module.load_state_dict(weights)
    if not ema or "ema" not in checkpoint.tensors:
        return "raw"
    # The trainer averages the parameters it trains, in module.parameters() order (every one of
    # the module's, as each stage trains the whole module).
    shadow = ema_shadow(checkpoint)
    parameters = list(module.parameters())
    if len(shadow) != len(parameters):
        raise FeatInvError(
            f"the checkpoint {checkpoint.path} averages {len(shadow)} tensors, the module has {len(parameters)}"
        )
    with torch.no_grad():
        for parameter, average in zip(parameters, shadow, strict=True):
            parameter.copy_(average)
    return "ema"
