"""The one table of limits: the smallest and largest value every count, size, step number and
rate accepts, each with its reason, checked alike by the command line (:func:`arg`, an argparse
``type``) and by the public API (:func:`within`).

A limit is chosen from what the machines can hold (a 24 GiB CPU machine, a 139 GiB GPU) and what
anyone would ask for; past it a typo would hang, exhaust memory or overflow. Zero and negative
values are refused where they mean nothing: no option reads 0 as "not given".
"""

from __future__ import annotations

import argparse
import math
import numbers
from dataclasses import dataclass

from featinv.errors import MAX_SEED, FeatInvError


@dataclass(frozen=True)
class Limit:
    """The accepted range of one quantity: ``[low, high]`` (``(low, high]`` when ``open_low``)."""

    low: float
    high: float
    reason: str
    integer: bool = True
    open_low: bool = False
    open_high: bool = False

    def describe(self) -> str:
        """The range as a message says it, e.g. ``an integer in [1, 1000]``."""
        kind = "an integer" if self.integer else "a number"
        left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
        return f"{kind} in {left}{_show(self.low)}, {_show(self.high)}{right}"

    def accepts(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.integer else numbers.Real):
            return False
        if not isinstance(value, numbers.Integral) and not math.isfinite(value):
            return False
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below


def _show(bound: float) -> str:
    if bound == MAX_SEED:
        return "2^63 - 1"
    return f"{bound:,}".replace(",", "_") if isinstance(bound, int) and bound >= 100_000 else f"{bound:g}"


def _rate(low: float, high: float, reason: str, **kw) -> Limit:
    return Limit(low, high, reason, integer=False, **kw)


# Quantity -> its limit. Options and arguments name the quantity they carry (``--teacher-steps`` is
# "steps"); a new option picks its row here, and tests/test_limits.py refuses a bare int or float.
LIMITS: dict[str, Limit] = {
    # sampling
    "steps": Limit(1, 999, "sampler steps: fewer than the noise schedule's 1000 timesteps"),
    "samples": Limit(1, 1000, "reconstructions per input: each is a whole sampling run"),
    "batch_size": Limit(1, 8192, "rows per batch: 8192 activations of the smallest model fill a 139 GiB GPU"),
    "inner_steps": Limit(0, 100, "gradient steps per sampler step, 0 for none: 100 x 1000 steps is days"),
    "opt_steps": Limit(1, 100_000, "Adam steps on pixels: the baseline converges in 300-1000"),
    "guidance": _rate(0, 50, "classifier-free guidance scale: past ~20 images saturate"),
    "eta": _rate(0, 1, "DDIM eta: 0 deterministic, 1 DDPM"),
    "strength": _rate(0, 10, "guidance strength: a share of the noise prediction, 0.3 by default"),
    "step_size": _rate(0, 1, "RMS change per inner step, in [-1, 1] pixel units", open_low=True),
    # sizes
    "input_size": Limit(8, 4096, "classifier input side in pixels: 4096^2 inputs are 16x a 1k^2 image"),
    "image_size": Limit(8, 4096, "output side in pixels: SD-family bases are made for 256-1024"),
    "data_size": Limit(8, 1024, "shapes image side in pixels: procedural, larger only costs memory"),
    "hint_channels": Limit(1, 4096, "hint encoder width: 4096 is 8x the default 512"),
    # data
    "images": Limit(1, 100_000, "images evaluated or generated at once: 100k 224-px images fill 56 GiB"),
    "pool": Limit(1, 500_000, "training pool images, generated in memory: 500k 32-px images take 6 GiB"),
    "seed": Limit(0, MAX_SEED, "a torch generator seed is a 64-bit integer"),
    "class_index": Limit(0, 1_000_000, "a class of the classifier's head, checked against it after"),
    "severity": Limit(1, 5, "the corruption severities of Hendrycks & Dietterich are 1-5"),
    "epsilon": _rate(0, 1, "PGD L-inf radius on [0, 1] pixels"),
    # training
    "train_steps": Limit(1, 10_000_000, "optimizer steps: 10 million is weeks on a GPU"),
    "grad_accum": Limit(1, 1024, "micro-batches per optimizer step"),
    "every": Limit(0, 10_000_000, "steps between checkpoints or validations, 0 for only at stops or none"),
    "keep_checkpoints": Limit(0, 10_000, "the newest checkpoints kept, 0 for all"),
    "timestep": Limit(1, 1000, "a timestep bound: the noise schedule has 1000 timesteps"),
    "lr": _rate(0, 10, "peak learning rate: AdamW diverges long before 10", open_low=True),
    "scale": _rate(0, 1000, "multiplies a preset's step counts: 1000x is 8 million base steps", open_low=True),
    "ema": _rate(0, 1, "EMA decay, strictly between 0 and 1", open_low=True, open_high=True),
    "weight": _rate(0, 1000, "a loss weight"),
    "distill_guidance": _rate(1, 50, "the teacher's guidance folded into the student"),
    "seconds": _rate(0, 31_536_000, "a time budget in seconds, at most a year; 0 stops after one step"),
    # serving and export
    "max_images": Limit(1, 100_000, "feature maps the server keeps: 100k small maps fill memory"),
    "port": Limit(1, 65535, "a TCP port"),
    "opset": Limit(1, 64, "an ONNX opset; the exporter narrows it to those the installed torch.onnx writes"),
    "few_steps": Limit(1, 4, "a distilled model samples in 1-4 steps"),
}


def within(quantity: str, value: object, name: str | None = None) -> int | float:
    """``value`` if it lies in ``LIMITS[quantity]``; otherwise a FeatInvError naming ``name``
    (default: the quantity), the range, its reason and the value given."""
    limit = LIMITS[quantity]
    if not limit.accepts(value):
        raise FeatInvError(f"{name or quantity} must be {limit.describe()} ({limit.reason}), got {value!r}")
    return value


def arg(quantity: str):
    """An argparse ``type`` for ``LIMITS[quantity]``: it parses the text and refuses, in one usage
    line, a value out of range (``--samples 1000000000``, ``--input-size 0``, ``--lr nan``)."""
    limit = LIMITS[quantity]

    def parse(text: str) -> int | float:
        try:
            value = int(text) if limit.integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {limit.describe()}, got {text!r}") from None
        if not limit.accepts(value):
            raise argparse.ArgumentTypeError(f"must be {limit.describe()} ({limit.reason}), got {text}")
        return value

    parse.__name__ = quantity  # argparse names a type by it
    parse.limit = limit  # tests read it
    return parse
