"""An on-disk feature cache: the classifier runs once over a training pool, not once per step.

The cache is one safetensors file with ``features`` (N, 2, C, h, w): each pool image's feature map
unflipped and horizontally flipped (the only augmentation a cached run applies), and metadata
naming the feature spec and the pool, checked when the cache is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from featinv.errors import FeatInvError
from featinv.features import FeatureExtractor
from featinv.files import require_file
from featinv.weights import save_state_dict_atomic


class OnlineFeatures:
    """Feature maps computed in the loop, batched on the device, by the frozen classifier."""

    def __init__(self, extractor: FeatureExtractor) -> None:
        self.extractor = extractor

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, index: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        return self.extractor(images)


class CachedFeatures:
    """Feature maps read from a cache made once by :func:`featinv.training.feature_cache.build_cache`:
    ``features`` (N, 2, C, h, w) for each pool image, unflipped and flipped."""

    def __init__(self, features: torch.Tensor) -> None:
        self.features = features

    def __call__(self, images: torch.Tensor, index: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        rows = self.features[index.to(self.features.device), flips.long().to(self.features.device)]
        return rows.to(images.device, torch.float32)


FeatureSource = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

"""(images, pool indices, flips) -> feature maps (B, C, h, w)."""


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pool_identity(stream: Any) -> dict[str, Any]:
    """What identifies a training pool: its kind, size and seed (or folder)."""
    return json.loads(json.dumps({"kind": type(stream).__name__, "size": len(stream), **stream.identity}))


@torch.no_grad()
def build_cache(
    extractor: FeatureExtractor,
    stream: Any,
    path: str | Path,
    *,
    batch_size: int = 256,
    dtype: str = "float32",
    progress: bool = True,
) -> Path:
    """Compute the feature maps of every pool image (unflipped and flipped) and write ``path``."""
    if dtype not in DTYPES:
        raise FeatInvError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    device = next(extractor.classifier.parameters()).device
    n = len(stream)
    rows = []
    for start in tqdm(range(0, n, batch_size), desc="caching features", unit="batch", disable=not progress):
        index = torch.arange(start, min(start + batch_size, n), device=device)
        pair = []
        for flip in (False, True):
            flips = torch.full((len(index),), flip, dtype=torch.bool, device=device)
            images, _ = stream.take(index, flips)
            pair.append(extractor(images.to(device)).to(DTYPES[dtype]).cpu())
        rows.append(torch.stack(pair, dim=1))
    features = torch.cat(rows)
    metadata = {"feature_spec": json.dumps(extractor.spec.to_dict()), "pool": json.dumps(pool_identity(stream))}
    path = Path(path)
    save_state_dict_atomic({"features": features}, path, metadata=metadata)
    return path


def load_cache(path: str | Path, extractor: FeatureExtractor, stream: Any) -> CachedFeatures:
    """Load a cache made for this extractor's feature spec and this pool.

    Raises:
        FeatInvError: missing or damaged file, or a cache made for another spec or pool.
    """
    path = require_file(path, "feature cache", " (make it with 'featinv features cache')")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            features = handle.get_tensor("features")
        spec, pool = json.loads(metadata["feature_spec"]), json.loads(metadata["pool"])
    except Exception as error:  # safetensors raises several types for damaged files
        raise FeatInvError(f"feature cache {path} is damaged or not a featinv cache ({error})") from error
    expected = json.loads(json.dumps(extractor.spec.to_dict()))
    if spec != expected:
        raise FeatInvError(f"feature cache {path} was made for features {spec}, not {expected}")
    if pool != pool_identity(stream):
        raise FeatInvError(f"feature cache {path} was made for the pool {pool}, not {pool_identity(stream)}")
    return CachedFeatures(features)
