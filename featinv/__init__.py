"""featinv: see what an image classifier sees, by inverting its feature maps with a conditional
diffusion model (FeatInv, Neukirch, Vielhaben & Strodthoff, arXiv 2505.21032)."""

from featinv._source_kernels import map_source_kernels
from featinv.errors import FeatInvError
from featinv.features import FeatureExtractor, FeatureSpec
from featinv.models import FeatInvModel
from featinv.pipeline import Reconstruction, Reconstructor

map_source_kernels()

__version__ = "0.1.0"

__all__ = ["FeatInvError", "FeatInvModel", "FeatureExtractor", "FeatureSpec", "Reconstruction", "Reconstructor"]
