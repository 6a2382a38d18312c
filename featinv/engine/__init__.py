"""Denoiser backends behind one interface (``Denoiser``): ``eager`` is the reference."""

from featinv.engine.base import Denoiser
from featinv.engine.eager import EagerDenoiser
from featinv.errors import FeatInvError

BACKENDS = ("eager",)


def make_denoiser(model, backend: str = "eager") -> Denoiser:
    """The denoiser of ``model`` on the named backend."""
    if backend == "eager":
        return EagerDenoiser(model)
    raise FeatInvError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


__all__ = ["BACKENDS", "Denoiser", "EagerDenoiser", "make_denoiser"]
