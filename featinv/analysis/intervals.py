"""95% confidence intervals for means of per-image metrics: how far a figure over N images can be
trusted, and whether one method's lead over another is more than the sample's luck.

* A rate (values all 0 or 1, e.g. top-1 agreement): the Wilson score interval (Wilson 1927), which
  stays inside [0, 1] and keeps its coverage near 0 and 1 where the normal approximation does not.
* Any other mean (cosine, IoU, distances): the percentile bootstrap (Efron & Tibshirani 1993, ch. 13),
  resampling images with a seeded generator, so the same values always give the same interval.
* A difference between two methods on the same images: the paired bootstrap of the mean difference
  (the same resampled images for both), which is far narrower than two separate intervals suggest.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

from featinv.errors import FeatInvError, require_positive_int

LEVEL = 0.95
RESAMPLES = 2000


def _check(name: str, values: torch.Tensor) -> torch.Tensor:
    values = torch.as_tensor(values).detach().cpu().double().flatten()
    if values.numel() == 0:
        raise FeatInvError(f"{name} must hold at least one value, got an empty tensor")
    if not bool(torch.isfinite(values).all()):
        raise FeatInvError(f"{name} must be finite, got NaN or Inf among its {values.numel()} values")
    return values


def _check_level(level: float) -> float:
    if not 0 < level < 1:
        raise FeatInvError(f"level must be in (0, 1), got {level!r}")
    return level


def wilson_interval(successes: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson score interval of a rate ``successes / n``: (low, high) within [0, 1]."""
    require_positive_int("n", n)
    if isinstance(successes, bool) or not isinstance(successes, int) or not 0 <= successes <= n:
        raise FeatInvError(f"successes must be an integer in [0, n={n}], got {successes!r}")
    z = NormalDist().inv_cdf(0.5 + _check_level(level) / 2)
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _bootstrap_means(values: torch.Tensor, resamples: int, seed: int) -> torch.Tensor:
    """(resamples,) means of ``values`` (N,) resampled with replacement (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(values), (require_positive_int("resamples", resamples), len(values)), generator=generator)
    return values[picks].mean(1)


def percentile_interval(statistics: torch.Tensor, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` range of a statistic's bootstrap replicates (R,): (low, high)."""
    tail = (1 - _check_level(level)) / 2
    statistics = torch.as_tensor(statistics, dtype=torch.float64)
    low, high = torch.quantile(statistics, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return float(low), float(high)


def bootstrap_interval(
    values: torch.Tensor, level: float = LEVEL, *, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``values`` (N,): (low, high)."""
    return percentile_interval(_bootstrap_means(_check("values", values), resamples, seed), level)


def mean_interval(values: torch.Tensor, level: float = LEVEL) -> tuple[float, float]:
    """The interval of the mean of per-image ``values`` (N,): Wilson's for a rate (all values 0 or
    1), the bootstrap's otherwise."""
    values = _check("values", values)
    if bool(((values == 0) | (values == 1)).all()):
        return wilson_interval(int(values.sum()), len(values), level)
    return bootstrap_interval(values, level)


def difference_interval(a: torch.Tensor, b: torch.Tensor, level: float = LEVEL) -> tuple[float, float]:
    """The paired bootstrap interval of ``mean(a - b)``, where ``a[i]`` and ``b[i]`` (N,) are two
    methods' values on the same image ``i``."""
    a, b = _check("a", a), _check("b", b)
    if a.shape != b.shape:
        raise FeatInvError(f"a and b must hold one value per image each, got {len(a)} and {len(b)} values")
    return bootstrap_interval(a - b, level)


def format_interval(mean: float, interval: tuple[float, float] | list[float], digits: int = 3) -> str:
    """``"0.925 [0.880, 0.954]"``: a mean and its interval, for reports and the terminal."""
    low, high = interval
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
