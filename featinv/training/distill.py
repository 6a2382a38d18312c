"""Distillation of a FeatInv model into a few-step one, through the one training loop
(:class:`featinv.training.loop.Trainer`: checkpoints, exact resume, EMA, accelerate).

The student is a copy of the teacher's ControlNet; the base UNet stays frozen and shared (nothing
of the base is copied, so a distilled model ships as one more ControlNet on the shared base). The
teacher's classifier-free guidance is folded in: the student runs one branch per step, not two.
Targets (:class:`DistillConfig`):

- ``guidance`` (guidance distillation, Meng et al. 2023, arXiv 2210.03142): the student's noise
  matched to the teacher's guided noise; a noise predictor still, sampled by DPM-Solver++.
- ``trajectory``: the student's own 4-step DPM-Solver++ solve from noise matched to the teacher's
  guided many-step solve from the same noise (the regression loss of distribution matching
  distillation, Yin et al. 2024, arXiv 2311.18828, through the few-step sampler), differentiated
  through every student step: it also corrects the 4-step solver's error. The shipped real-time
  model is ``guidance``, then ``trajectory`` from it (README, "Real-time mode").
- ``consistency`` and ``endpoint`` (latent consistency models, Luo et al. 2023, arXiv 2310.04378):
  the one-step clean estimate ``f(x_t, t) = (x_t - sqrt(1-a_t) eps) / sqrt(a_t)`` fitted to LCM's
  bootstrapped target (one guided DDIM step of the teacher from t to ``t - skip`` on a grid of
  T / skip = 50 points, then the student's own estimate there with the gradient stopped, as
  improved consistency training does, Song & Dhariwal 2023, arXiv 2310.14189), or to the teacher's
  trajectory solved to the clean image; sampled by :meth:`featinv.sampling.NoiseSchedule.lcm`
  (``sampler="lcm"``). On the shapes demo both kept less fidelity at 4 steps than the teacher run
  for 4 DPM-Solver++ steps itself, so they are not the default.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from featinv.choices import DISTILL_TARGETS
from featinv.data.streams import ShapesStream
from featinv.errors import FeatInvError
from featinv.limits import within
from featinv.models.featinv_model import FeatInvModel
from featinv.sampling.dpmpp import sample_dpmpp_2m
from featinv.sampling.schedule import LCM_SKIP
from featinv.training.feature_cache import FeatureSource
from featinv.training.loop import TrainConfig, TrainResult, alphas_table, fit, unwrap
from featinv.training.losses import FeatureConsistencyLoss

TARGETS = DISTILL_TARGETS


@dataclass(frozen=True)
class DistillConfig:
    """What the student learns: the teacher's ``guidance_scale`` ODE on a grid ``skip`` apart.

    ``target``: ``consistency`` (one teacher DDIM step, then the student's own estimate: LCM's
    bootstrapped target) or ``endpoint`` (the teacher's ODE solved to the clean image by
    ``teacher_steps`` DPM-Solver++ steps, at the timesteps the 1-, 2- and 4-step lcm samplers visit:
    the consistency function's defining value, fitted directly as in knowledge distillation, Luhman &
    Luhman 2021; more teacher work per step, no bootstrapping, so it needs far fewer steps), or
    ``guidance``: guidance distillation (Meng et al. 2023, arXiv 2210.03142, stage 1), the student's
    noise in one branch matched to the teacher's guided noise at the timesteps DPM-Solver++ visits in
    1, 2 and 4 steps; the model stays a noise predictor, sampled by DPM-Solver++ in 4 steps (the
    ``dpmpp`` sampler) at the cost of one branch instead of two. On the shapes demo it kept far
    more fidelity at 4 steps than either consistency target (README, "Real-time mode"); or
    ``trajectory``: the student's own ``student_steps``-step DPM-Solver++ solve from noise fitted to the
    teacher's guided ``teacher_steps``-step solve from the same noise (the regression loss of
    distribution matching distillation, Yin et al. 2024, through the few-step sampler), so the student
    also learns to correct the few-step solver's error; best started from a guidance-distilled
    student (``distill(..., student=...)``)."""

    guidance_scale: float = 1.75
    skip: int = LCM_SKIP
    target: str = "guidance"
    teacher_steps: int = 6
    student_steps: int = 4

    def __post_init__(self) -> None:
        within("distill_guidance", self.guidance_scale, "guidance_scale")
        if isinstance(self.skip, bool) or not isinstance(self.skip, int) or self.skip < 1:
            raise FeatInvError(f"skip must be a positive integer, got {self.skip!r}")
        if self.target not in TARGETS:
            raise FeatInvError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        within("steps", self.teacher_steps, "teacher_steps")
        within("steps", self.student_steps, "student_steps")

    def to_dict(self) -> dict[str, Any]:
        """What a distilled model's featinv.json records under ``distillation``."""
        if self.target in ("guidance", "trajectory"):  # either way a noise predictor, sampled by DPM-Solver++
            return {"method": "guidance", "guidance_scale": float(self.guidance_scale)}
        return {"method": "consistency", "guidance_scale": float(self.guidance_scale), "skip": self.skip}


class DistillationLoss:
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
        consistency: FeatureConsistencyLoss | None = None,
    ) -> None:
        schedule = model.noise_schedule
        if schedule.num_train_timesteps % distill.skip:
            raise FeatInvError(
                f"skip {distill.skip} must divide the schedule's {schedule.num_train_timesteps} timesteps"
            )
        self.model, self.teacher, self.features, self.stream = model, teacher, features, stream
        self.batch_size, self.distill, self.seed = batch_size, distill, seed
        if consistency is not None and distill.target != "trajectory":
            raise FeatInvError(f"a feature-consistency term goes with the trajectory target, not {distill.target}")
        self.consistency = consistency
        self.autocast = autocast or (lambda device: contextlib.nullcontext())
        self.alphas = alphas_table(model, model.context.device)
        self.points = schedule.num_train_timesteps // distill.skip
        # endpoint and guidance targets: at the timesteps their 1-, 2- and 4-step samplers visit
        if distill.target == "endpoint":
            self.visited = sorted({t for n in (1, 2, 4) for t in schedule.lcm(n, distill.skip).timesteps})
        if distill.target == "guidance":
            self.guidance_visited = sorted({t for n in (1, 2, 4) for t in schedule.dpmpp_2m(n).timesteps})
        if distill.target == "trajectory":
            self.teacher_schedule = schedule.dpmpp_2m(distill.teacher_steps)
            self.student_schedule = schedule.dpmpp_2m(distill.student_steps)

    def clean_estimate(self, controlnet, x: torch.Tensor, t: torch.Tensor, context, hint) -> torch.Tensor:
        """The consistency function: x0 (B, C, H, W) from x_t with the given ControlNet's noise."""
        a = self.alphas[t].view(-1, 1, 1, 1)
        eps = self.model.predict_noise(x, t, context, hint, controlnet=controlnet).float()
        return (x - (1 - a).sqrt() * eps) / a.sqrt()

    def teacher_denoiser(self, maps: torch.Tensor):
        """(x, t) -> the teacher's guided eps for the maps (B, C, h, w): both branches in one batch,
        guided as the model is sampled (``model.guidance``)."""
        model, b = self.model, len(maps)
        hint_pair = model.guidance_hints(maps, embed=self.teacher.embed)
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

    def _draw(self, key: int, part: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator]:
        """Batch ``key``'s share ``part``: (pool indices, flips, images on the device) and the batch's
        seeded generator, which then draws its timesteps and noise (whole batch, then ``part``)."""
        index, flips = self.stream.draw(key, self.batch_size)
        images, _ = self.stream.take(index, flips, key=key)
        g = torch.Generator().manual_seed(self.seed * 104_729 + key)
        return index[part], flips[part], images[part].to(self.model.context.device), g

    def _noise(self, g: torch.Generator, part: slice) -> torch.Tensor:
        """The batch's noise (B, *latent_shape), drawn for the whole batch, then ``part`` of it."""
        noise = torch.randn((self.batch_size, *self.model.latent_shape), generator=g)
        return noise[part].to(self.model.context.device)

    def __call__(self, module: torch.nn.Module, key: int, part: slice = slice(None)) -> torch.Tensor:
        if self.distill.target == "endpoint":
            return self._endpoint_loss(module, key, part)
        if self.distill.target == "guidance":
            return self._guidance_loss(module, key, part)
        if self.distill.target == "trajectory":
            return self._trajectory_loss(module, key, part)
        model, skip, device = self.model, self.distill.skip, self.model.context.device
        index, flips, images, g = self._draw(key, part)
        j = torch.randint(0, self.points, (self.batch_size,), generator=g)[part].to(device)
        noise = self._noise(g, part)
        t = (j + 1) * skip - 1
        t_prev = (t - skip).clamp_min(0)
        first = (j == 0).view(-1, 1, 1, 1)  # the grid's first point: the step ends at a clean image
        inner = unwrap(module)
        with torch.no_grad():
            a = self.alphas[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * model.encode(images) + (1 - a).sqrt() * noise
            maps = self.features(images, index, flips)
            b = len(x_t)
            # the teacher's guided DDIM step t -> t - skip
            eps = self.teacher_denoiser(maps)(x_t, t)
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
        index, flips, images, g = self._draw(key, part)
        t = self.visited[int(torch.randint(0, len(self.visited), (1,), generator=g))]
        noise = self._noise(g, part)
        inner = unwrap(module)
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

    def _guidance_loss(self, module: torch.nn.Module, key: int, part: slice) -> torch.Tensor:
        """The student's noise (one branch) against the teacher's guided noise (two branches), each
        image at one of the timesteps DPM-Solver++ visits in 1, 2 or 4 steps."""
        model, device = self.model, self.model.context.device
        index, flips, images, g = self._draw(key, part)
        visited = torch.tensor(self.guidance_visited)
        t = visited[torch.randint(0, len(visited), (self.batch_size,), generator=g)][part].to(device)
        noise = self._noise(g, part)
        inner = unwrap(module)
        with torch.no_grad():
            a = self.alphas[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * model.encode(images) + (1 - a).sqrt() * noise
            maps = self.features(images, index, flips)
            target = self.teacher_denoiser(maps)(x_t, t)
        with self.autocast(device):
            context = model.context.expand(len(x_t), -1, -1)
            estimate = model.predict_noise(x_t, t, context, inner.embed(maps), controlnet=module)
        return F.mse_loss(estimate.float(), target)

    def _trajectory_loss(self, module: torch.nn.Module, key: int, part: slice) -> torch.Tensor:
        """The student's few-step solve from the batch's noise against the teacher's guided solve
        from the same noise, both by DPM-Solver++; the gradient runs through every student step."""
        model, device = self.model, self.model.context.device
        index, flips, images, g = self._draw(key, part)
        noise = self._noise(g, part)
        inner = unwrap(module)
        with torch.no_grad():
            maps = self.features(images, index, flips)
            target = sample_dpmpp_2m(self.teacher_denoiser(maps), noise, self.teacher_schedule)
        context = model.context.expand(len(noise), -1, -1)
        with self.autocast(device):
            hint = inner.embed(maps)

            def student(x: torch.Tensor, t: int) -> torch.Tensor:
                timesteps = torch.full((len(x),), t, device=device)
                return model.predict_noise(x, timesteps, context, hint, controlnet=module).float()

            estimate = sample_dpmpp_2m(student, noise, self.student_schedule)
        loss = F.mse_loss(estimate.float(), target)
        if self.consistency is not None:  # the student's images' features against the condition
            loss = loss + self.consistency.of_samples(model, estimate, maps)
        return loss


def distill(
    model: FeatInvModel,
    features: FeatureSource,
    stream: ShapesStream,
    config: TrainConfig,
    distill: DistillConfig = DistillConfig(),
    *,
    seed: int = 0,
    student: FeatInvModel | None = None,
    consistency: FeatureConsistencyLoss | None = None,
    **trainer_kwargs: Any,
) -> TrainResult:
    """Distil ``model`` in place: its ControlNet becomes the student, the teacher a frozen copy of it
    as it is now (so always start from the teacher's folder; ``resume`` continues a distillation
    from its checkpoints). ``features``: (images, pool indices, flips) -> maps, as for ControlNet
    training. ``trainer_kwargs``: ``checkpoint_dir``, ``log_path``, ``resume``, ``after_step``,
    ``name``. Marks the model distilled (``model.distillation``) when done. ``student``: a model
    distilled from the same teacher whose ControlNet the student starts from (a second stage, e.g.
    ``trajectory`` after ``guidance``) instead of the teacher's. ``consistency``: with the
    ``trajectory`` target, adds the feature-consistency loss of the student's few-step images
    against the conditioning maps (:class:`featinv.training.losses.FeatureConsistencyLoss`)."""
    teacher = copy.deepcopy(model.controlnet).eval().requires_grad_(False)
    if student is not None:
        _start_from(model, student)
    model.unet.eval().requires_grad_(False)
    student = model.controlnet.requires_grad_(True)
    loss = DistillationLoss(
        model,
        teacher,
        features,
        stream,
        config.batch_size,
        distill,
        seed=seed,
        autocast=config.autocast,
        consistency=consistency,
    )
    name = trainer_kwargs.pop("name", "distill")
    result = fit(name, student, loss, config, **trainer_kwargs)
    student.requires_grad_(False)
    model.distillation = distill.to_dict()
    return result


def _start_from(model: FeatInvModel, student: FeatInvModel) -> None:
    """Load ``student``'s ControlNet into ``model``'s, after checking it is a distilled model of the
    same feature spec and ControlNet shape."""
    if student.distillation is None:
        raise FeatInvError("the student to start from is not distilled: give a folder made by featinv train --distill")
    if student.feature_spec != model.feature_spec:
        raise FeatInvError(
            f"the student to start from inverts {student.feature_spec.describe()}, the teacher "
            f"{model.feature_spec.describe()}: they must match"
        )
    theirs, ours = student.controlnet.state_dict(), model.controlnet.state_dict()
    if {k: v.shape for k, v in theirs.items()} != {k: v.shape for k, v in ours.items()}:
        raise FeatInvError("the student to start from has another ControlNet architecture than the teacher's")
    model.controlnet.load_state_dict(theirs)
