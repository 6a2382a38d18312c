"""Confidence intervals of per-image metrics (featinv.analysis.intervals): exact where a reference
exists, the promised coverage where it does not, and the paired difference's advantage."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import binomtest

from featinv.analysis.intervals import (
    bootstrap_interval,
    difference_interval,
    format_interval,
    mean_interval,
    wilson_interval,
)
from featinv.errors import FeatInvError


@pytest.mark.parametrize(("successes", "n"), [(185, 200), (0, 10), (10, 10), (1, 1), (37, 64)])
def test_wilson_interval_equals_scipys(successes, n):
    expected = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(successes, n) == pytest.approx((expected.low, expected.high), abs=1e-12)


def test_a_rate_gets_wilsons_interval_and_other_means_the_bootstrap():
    hits = torch.tensor([1.0] * 37 + [0.0] * 27)
    assert mean_interval(hits) == wilson_interval(37, 64)
    values = torch.linspace(0.2, 0.9, 50)
    low, high = mean_interval(values)
    assert (low, high) == bootstrap_interval(values)  # seeded: the same values, the same interval
    assert low < float(values.mean()) < high and high - low < 0.2


def test_the_intervals_cover_the_true_mean_as_promised():
    generator = torch.Generator().manual_seed(0)
    # Skewed per-image values (exponential, true mean 1), 40 images a sample.
    samples = torch.empty(300, 40).exponential_(1.0, generator=generator)
    covered = sum(low <= 1.0 <= high for low, high in (bootstrap_interval(s, resamples=1000) for s in samples))
    assert 0.88 <= covered / len(samples) <= 0.99, covered  # percentile bootstrap: slightly under 95% at n=40
    # A rate near 1 (p = 0.9), 50 images a sample.
    hits = (torch.rand(300, 50, generator=generator) < 0.9).float()
    covered = sum(low <= 0.9 <= high for low, high in map(mean_interval, hits))
    assert 0.92 <= covered / len(hits) <= 0.995, covered
    # More images, a narrower interval.
    narrow, wide = bootstrap_interval(samples.flatten()[:4000]), bootstrap_interval(samples[0])
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 5


def test_the_paired_difference_sees_a_lead_that_separate_intervals_hide():
    generator = torch.Generator().manual_seed(1)
    difficulty = torch.rand(60, generator=generator)  # images differ far more than the methods do
    a = difficulty + 0.03 + 0.01 * torch.randn(60, generator=generator)
    b = difficulty
    a_low, _ = mean_interval(a)
    _, b_high = mean_interval(b)
    assert a_low < b_high  # the separate intervals overlap
    low, high = difference_interval(a, b)
    assert 0 < low < 0.03 < high  # the paired one excludes 0 and holds the true lead
    low, high = difference_interval(b, b[torch.randperm(60, generator=generator)])
    assert low < 0 < high  # no lead: 0 inside


def test_formatting():
    assert format_interval(0.925, (0.87996, 0.95403)) == "0.925 [0.880, 0.954]"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: mean_interval(torch.tensor([])), "values must hold at least one value"),
        (lambda: mean_interval(torch.tensor([0.5, float("nan")])), "values must be finite"),
        (lambda: wilson_interval(11, 10), r"successes must be an integer in \[0, n=10\], got 11"),
        (lambda: wilson_interval(3, 0), "n must be a positive integer, got 0"),
        (lambda: bootstrap_interval(torch.ones(3), 1.5), r"level must be in \(0, 1\), got 1.5"),
        (lambda: difference_interval(torch.ones(3), torch.ones(4)), "one value per image each, got 3 and 4"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(FeatInvError, match=message):
        call()
