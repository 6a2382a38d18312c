"""Consistency distillation of a FeatInv model into a few-step one (latent consistency models, Luo et
al. 2023, arXiv 2310.04378), through the one training loop (:class:`featinv.training.loop.Trainer`:
checkpoints, exact resume, EMA, accelerate).

The student is a copy of the teacher's ControlNet; the base UNet stays frozen and shared (nothing
of the base is copied, so the distilled model ships as one more ControlNet on the shared base).
Its consistency function is the one-step clean estimate ``f(x_t, t) = (x_t - sqrt(1-a_t) eps) /
sqrt(a_t)`` (LCM's boundary scaling only matters at t < ~10, which the few-step sampler never
visits). Each training step:

1. draws clean images, their feature maps, and a timestep t from the grid ``skip - 1, 2 skip - 1,
   ..., T - 1`` (T / skip = 50 points, as LCM) and noises the images to x_t;
2. takes one DDIM step of the teacher from t to ``t - skip`` with classifier-free guidance at
   ``guidance_scale`` (folded in: the student then needs one branch, not two);
3. makes the student's estimate at (x_t, t) match its own estimate at the teacher's x_{t - skip}
   (gradient stopped; the teacher's x0 at the grid's first point), by squared error. The target
   is the student itself with the gradient stopped, without the EMA copy of the original
   consistency models: improved consistency training (Song & Dhariwal 2023, arXiv 2310.14189)
   found that better, and it keeps resuming exact (nothing but the student to checkpoint).

Sample a distilled model with :meth:`featinv.sampling.NoiseSchedule.lcm` (``sampler="lcm"``).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from featinv.errors import FeatInvError
from featinv.models.featinv_model import FeatInvModel
from featinv.sampling.dpmpp import sample_dpmpp_2m
from featinv.sampling.schedule import LCM_SKIP
from featinv.training.loop import TrainConfig, TrainResult
from featinv.training.train import FeatureSource, ShapesStream, _alphas, _fit, _unwrap

TARGETS = ("consistency", "endpoint")


@dataclass(frozen=True)
class DistillConfig:
    """What the student learns: the teacher's ``guidance_scale`` ODE on a grid ``skip`` apart.

    ``target``: ``consistency`` (one teacher DDIM step, then the student's own estimate: LCM's
    bootstrapped target) or ``endpoint`` (the teacher's ODE solved to the clean image by
    ``teacher_steps`` DPM-Solver++ steps, at the timesteps the 1-, 2- and 4-step lcm samplers visit:
    the consistency function's defining value, fitted directly as in knowledge distillation, Luhman &
    Luhman 2021; more teacher work per step, no bootstrapping, so it needs far fewer steps)."""

    guidance_scale: float = 1.75
    skip: int = LCM_SKIP
    target: str = "consistency"
    teacher_steps: int = 6

    def __post_init__(self) -> None:
        if not (isinstance(self.guidance_scale, (int, float)) and 1.0 <= self.guidance_scale <= 50.0):
            raise FeatInvError(f"guidance_scale must be in [1, 50], got {self.guidance_scale!r}")
        if isinstance(self.skip, bool) or not isinstance(self.skip, int) or self.skip < 1:
            raise FeatInvError(f"skip must be a positive integer, got {self.skip!r}")
        if self.target not in TARGETS:
            raise FeatInvError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if isinstance(self.teacher_steps, bool) or not isinstance(self.teacher_steps, int) or self.teacher_steps < 1:
            raise FeatInvError(f"teacher_steps must be a positive integer, got {self.teacher_steps!r}")

    def to_dict(self) -> dict[str, Any]:
        """What a distilled model's featinv.json records under ``distillation``."""
        return {"method": "consistency", "guidance_scale": float(self.guidance_scale), "skip": self.skip}


class ConsistencyLoss:
    """The distillation loss of batch ``key`` (see the module): a pure function of (seed, key) and
    the student's weights, as :class:`featinv.training.loop.Trainer` needs for exact resumes.

    Args:
        model: the FeatInv model whose ControlNet is the student.
        teacher: the teacher's ControlNet (frozen), on the same base.
        features: (images, pool indices, flips) -> feature maps (B, C, h, w).
        stream: the training images.
        batch_size: the global batch.
        distill: the teacher's guidance scale and the grid's spacing.
        seed: seeds the timesteps and noise of every batch.
    """

    def __init__(
        self,
        model: FeatInvModel,
        teacher: torch.nn.Module,
        features: FeatureSource,
        stream: ShapesStream,
        batch_size: int,
        distill: DistillConfig = DistillConfig(),
        *,
        seed: int = 0,
        autocast: Any = None,
    ) -> None:
        schedule = model.noise_schedule
        if schedule.num_train_timesteps % distill.skip:
            raise FeatInvError(
                f"skip {distill.skip} must divide the schedule's {schedule.num_train_timesteps} timesteps"
            )
        self.model, self.teacher, self.features, self.stream = model, teacher, features, stream
        self.batch_size, self.distill, self.seed = batch_size, distill, seed
        self.autocast = autocast or (lambda device: contextlib.nullcontext())
        self.alphas = _alphas(model, model.context.device)
        self.points = schedule.num_train_timesteps // distill.skip
        # endpoint targets: at the timesteps the 1-, 2- and 4-step samplers visit
        self.visited = sorted({t for n in (1, 2, 4) for t in schedule.lcm(n, distill.skip).timesteps})

    def clean_estimate(self, controlnet, x: torch.Tensor, t: torch.Tensor, context, hint) -> torch.Tensor:
        """The consistency function: x0 (B, C, H, W) from x_t with the given ControlNet's noise."""
        a = self.alphas[t].view(-1, 1, 1, 1)
        eps = self.model.predict_noise(x, t, context, hint, controlnet=controlnet).float()
        return (x - (1 - a).sqrt() * eps) / a.sqrt()

    def teacher_denoiser(self, maps: torch.Tensor):
        """(x, t) -> the teacher's guided eps for the maps (B, C, h, w): both branches in one batch."""
        model, b = self.model, len(maps)
        hint_pair = self.teacher.embed(torch.cat([torch.zeros_like(maps), maps]))
        contexts = model.guidance_contexts(b)

        def denoise(x: torch.Tensor, t) -> torch.Tensor:
            t = torch.as_tensor(t, device=x.device).expand(len(x)) if not torch.is_tensor(t) or t.dim() == 0 else t
            pair = torch.cat([x, x]), torch.cat([t, t]), contexts, hint_pair
            eps_u, eps_c = model.predict_noise(*pair, controlnet=self.teacher).float().chunk(2)
            return eps_u + self.distill.guidance_scale * (eps_c - eps_u)

        return denoise

    def endpoint(self, x_t: torch.Tensor, t: int, maps: torch.Tensor) -> torch.Tensor:
        """The teacher's clean image from x_t at timestep t: DPM-Solver++(2M) over ``teacher_steps``
        timesteps evenly from t down."""
        steps = min(self.distill.teacher_steps, t + 1)
        timesteps = sorted({round(t - i * (t + 1) / steps) for i in range(steps)}, reverse=True)
        schedule = self.model.noise_schedule.dpmpp_2m_at(timesteps)
        return sample_dpmpp_2m(self.teacher_denoiser(maps), x_t, schedule)

    def __call__(self, module: torch.nn.Module, key: int, part: slice = slice(None)) -> torch.Tensor:
        if self.distill.target == "endpoint":
            return self._endpoint_loss(module, key, part)
        model, skip, device = self.model, self.distill.skip, self.model.context.device
        index, flips = self.stream.draw(key, self.batch_size)
        images, _ = self.stream.take(index, flips, key=key)
        g = torch.Generator().manual_seed(self.seed * 104_729 + key)
        j = torch.randint(0, self.points, (len(images),), generator=g)
        noise = torch.randn((len(images), *model.latent_shape), generator=g)
        index, flips, images, j, noise = (v[part] for v in (index, flips, images.to(device), j, noise))
        j, noise = j.to(device), noise.to(device)
        t = (j + 1) * skip - 1
        t_prev = (t - skip).clamp_min(0)
        first = (j == 0).view(-1, 1, 1, 1)  # the grid's first point: the step ends at a clean image
        inner = _unwrap(module)
        with torch.no_grad():
            a = self.alphas[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * model.encode(images) + (1 - a).sqrt() * noise
            maps = self.features(images, index, flips)
            b = len(x_t)
            # the teacher's guided DDIM step t -> t - skip (unconditional branch first, as in sampling)
            hint_pair = self.teacher.embed(torch.cat([torch.zeros_like(maps), maps]))
            pair = torch.cat([x_t, x_t]), torch.cat([t, t]), model.guidance_contexts(b), hint_pair
            eps_u, eps_c = model.predict_noise(*pair, controlnet=self.teacher).float().chunk(2)
            eps = eps_u + self.distill.guidance_scale * (eps_c - eps_u)
            x0_teacher = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
            a_prev = torch.where(first, torch.ones_like(a), self.alphas[t_prev].view(-1, 1, 1, 1))
            x_prev = a_prev.sqrt() * x0_teacher + (1 - a_prev).sqrt() * eps
            context = model.context.expand(b, -1, -1)
            target = self.clean_estimate(inner, x_prev, t_prev, context, inner.embed(maps))
            target = torch.where(first, x0_teacher, target)
        with self.autocast(device):
            estimate = self.clean_estimate(module, x_t, t, context, inner.embed(maps))
        return F.mse_loss(estimate.float(), target)

    def _endpoint_loss(self, module: torch.nn.Module, key: int, part: slice) -> torch.Tensor:
        """The student's estimate at (x_t, t) against the teacher's endpoint; one visited t per batch."""
        model, device = self.model, self.model.context.device
        index, flips = self.stream.draw(key, self.batch_size)
        images, _ = self.stream.take(index, flips, key=key)
        g = torch.Generator().manual_seed(self.seed * 104_729 + key)
        t = self.visited[int(torch.randint(0, len(self.visited), (1,), generator=g))]
        noise = torch.randn((len(images), *model.latent_shape), generator=g)
        index, flips, images, noise = (v[part] for v in (index, flips, images.to(device), noise.to(device)))
        inner = _unwrap(module)
        with torch.no_grad():
            a = self.alphas[t]
            x_t = a.sqrt() * model.encode(images) + (1 - a).sqrt() * noise
            maps = self.features(images, index, flips)
            target = self.endpoint(x_t, t, maps)
        timesteps = torch.full((len(x_t),), t, device=device)
        with self.autocast(device):
            context = model.context.expand(len(x_t), -1, -1)
            estimate = self.clean_estimate(module, x_t, timesteps, context, inner.embed(maps))
        return F.mse_loss(estimate.float(), target)


def distill_consistency(
    model: FeatInvModel,
    features: FeatureSource,
    stream: ShapesStream,
    config: TrainConfig,
    distill: DistillConfig = DistillConfig(),
    *,
    seed: int = 0,
    **trainer_kwargs: Any,
) -> TrainResult:
    """Distil ``model`` in place: its ControlNet becomes the student, the teacher a frozen copy of it
    as it is now (so always start from the teacher's folder; ``resume`` continues a distillation
    from its checkpoints). ``features``: (images, pool indices, flips) -> maps, as for ControlNet
    training. ``trainer_kwargs``: ``checkpoint_dir``, ``log_path``, ``resume``, ``after_step``,
    ``name``. Marks the model distilled (``model.distillation``) when done."""
    teacher = copy.deepcopy(model.controlnet).eval().requires_grad_(False)
    model.unet.eval().requires_grad_(False)
    student = model.controlnet.requires_grad_(True)
    loss = ConsistencyLoss(
        model, teacher, features, stream, config.batch_size, distill, seed=seed, autocast=config.autocast
    )
    name = trainer_kwargs.pop("name", "distill")
    result = _fit(name, student, loss, config, **trainer_kwargs)
    student.requires_grad_(False)
    model.distillation = distill.to_dict()
    return result
