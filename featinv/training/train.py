"""Trainers for the built-in default: the demo classifier, the base diffusion UNet and the FeatInv
ControlNet (base frozen). Data is procedural (``shapes``): batch k is a pure function of
(seed, k), and so are the diffusion noise and timesteps of step k."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from featinv.features import FeatureExtractor
from featinv.models.featinv_model import FeatInvModel
from featinv.training.shapes import generate_shapes

CONDITION_DROPOUT = 0.15


class ShapesStream:
    """Training batches drawn from a pre-generated pool of ``shapes`` images on ``device``."""

    def __init__(self, pool_size: int, seed: int, device: torch.device, size: int = 32, chunk: int = 2048) -> None:
        parts = [
            generate_shapes(min(chunk, pool_size - i), seed * 100_003 + i, size, device=device)
            for i in range(0, pool_size, chunk)
        ]
        self.images = torch.cat([p.images for p in parts]).to(device)
        self.labels = torch.cat([p.labels for p in parts]).to(device)
        self.seed = seed

    def batch(self, step: int, batch_size: int, flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 7_919 + step)
        index = torch.randint(0, len(self.images), (batch_size,), generator=g).to(self.images.device)
        images, labels = self.images[index], self.labels[index]
        if flip:
            flips = (torch.rand(batch_size, generator=g) < 0.5).to(images.device)
            images = torch.where(flips[:, None, None, None], images.flip(-1), images)
        return images, labels


def _loop(
    name: str,
    steps: int,
    loss_fn: Callable[[int], torch.Tensor],
    params: list[torch.nn.Parameter],
    lr: float,
    log_path: Path | None,
    time_budget_s: float | None = None,
) -> list[float]:
    """AdamW with a one-cycle schedule and gradient clipping; stops early past ``time_budget_s``."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    losses: list[float] = []
    start = time.perf_counter()
    with tqdm(range(steps), desc=name, unit="step") as bar:
        for step in bar:
            loss = loss_fn(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            if step % 50 == 0 or step == steps - 1:
                value = float(loss.detach())
                losses.append(value)
                bar.set_postfix(loss=f"{value:.4f}")
                if log_path is not None:
                    with log_path.open("a") as log:
                        log.write(
                            json.dumps(
                                {"stage": name, "step": step, "loss": value, "seconds": time.perf_counter() - start}
                            )
                            + "\n"
                        )
            if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
                print(f"{name}: time budget of {time_budget_s:.0f} s reached after {step + 1} steps")
                break
    return losses


def train_classifier(
    extractor: FeatureExtractor,
    stream: ShapesStream,
    steps: int,
    *,
    batch_size: int = 256,
    lr: float = 3e-3,
    log_path: Path | None = None,
    time_budget_s: float | None = None,
) -> list[float]:
    """Cross-entropy training of the extractor's classifier on shapes labels."""
    classifier = extractor.classifier.train().requires_grad_(True)

    def loss_fn(step: int) -> torch.Tensor:
        images, labels = stream.batch(step, batch_size)
        return F.cross_entropy(classifier(extractor.preprocess(images)), labels)

    losses = _loop("classifier", steps, loss_fn, list(classifier.parameters()), lr, log_path, time_budget_s)
    classifier.eval().requires_grad_(False)
    return losses


def _alphas(model: FeatInvModel, device: torch.device) -> torch.Tensor:
    """The training alpha-bar table (num_train_timesteps,) as float32 on ``device``."""
    return torch.tensor(model.noise_schedule.alphas_cumprod(), dtype=torch.float32, device=device)


def _noisy(
    model: FeatInvModel, alphas: torch.Tensor, images: torch.Tensor, step: int, seed: int
) -> tuple[torch.Tensor, ...]:
    """x_t, t, the noise and the step's generator for the clean ``images`` of step ``step``."""
    g = torch.Generator().manual_seed(seed * 104_729 + step)
    device = images.device
    x0 = model.encode(images)
    t = torch.randint(0, model.noise_schedule.num_train_timesteps, (len(x0),), generator=g).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    a = alphas[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, t, noise, g


def train_base(
    model: FeatInvModel,
    stream: ShapesStream,
    steps: int,
    *,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    log_path: Path | None = None,
    time_budget_s: float | None = None,
) -> list[float]:
    """Noise-prediction training of the base UNet with the stored context (an unconditional model)."""
    unet = model.unet.train().requires_grad_(True)
    alphas = _alphas(model, model.context.device)

    def loss_fn(step: int) -> torch.Tensor:
        images, _ = stream.batch(step, batch_size)
        x_t, t, noise, _ = _noisy(model, alphas, images, step, seed)
        context = model.context.expand(len(x_t), -1, -1)
        with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=x_t.is_cuda):
            eps = unet(x_t, t, encoder_hidden_states=context, return_dict=False)[0]
        return F.mse_loss(eps.float(), noise)

    losses = _loop("base", steps, loss_fn, list(unet.parameters()), lr, log_path, time_budget_s)
    unet.eval().requires_grad_(False)
    return losses


def train_controlnet(
    model: FeatInvModel,
    extractor: FeatureExtractor,
    stream: ShapesStream,
    steps: int,
    *,
    batch_size: int = 128,
    lr: float = 5e-4,
    seed: int = 0,
    log_path: Path | None = None,
    time_budget_s: float | None = None,
    name: str = "controlnet",
) -> list[float]:
    """FeatInv ControlNet training with the base frozen: features online (batched on the device),
    15% condition dropout to the zero feature map with the null context."""
    model.unet.eval().requires_grad_(False)
    controlnet = model.controlnet.train().requires_grad_(True)
    alphas = _alphas(model, model.context.device)

    def loss_fn(step: int) -> torch.Tensor:
        images, _ = stream.batch(step, batch_size)
        with torch.no_grad():
            features = extractor(images)
        x_t, t, noise, g = _noisy(model, alphas, images, step, seed)
        drop = (torch.rand(len(x_t), generator=g) < CONDITION_DROPOUT).to(x_t.device)
        features = torch.where(drop[:, None, None, None], torch.zeros_like(features), features)
        context = torch.where(drop[:, None, None], model.null_context, model.context)
        with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=x_t.is_cuda):
            eps = model.predict_noise(x_t, t, context, controlnet.embed(features))
        return F.mse_loss(eps.float(), noise)

    losses = _loop(name, steps, loss_fn, list(controlnet.parameters()), lr, log_path, time_budget_s)
    controlnet.eval().requires_grad_(False)
    return losses


def loss_curve_png(log_path: Path, out: Path) -> None:
    """Plot the JSONL log's losses per stage (matplotlib, if installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    stages: dict[str, list[Any]] = {}
    for row in rows:
        stages.setdefault(row["stage"], []).append((row["step"], row["loss"]))
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3))
    for ax, (stage, points) in zip(list(axes) if len(stages) > 1 else [axes], stages.items(), strict=True):
        steps, losses = zip(*points, strict=True)
        ax.plot(steps, losses)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
