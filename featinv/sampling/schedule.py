"""The training noise schedule of a model and the per-step tables a sampler needs.

Tables are computed in double precision by ``featinv._C`` or its Python twin (``FEATINV_IMPL``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from featinv._native import schedule_tables
from featinv.errors import FeatInvError

LCM_SKIP = 20  # the consistency-distillation grid: T / 20 = 50 timesteps, as LCM's
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class SamplerSchedule:
    """Timesteps and update coefficients for one sampler run.

    Attributes:
        name: ``"ddim"``, ``"lcm"`` or ``"dpmpp_2m"``.
        timesteps: descending diffusion timesteps, one per step.
        coefficients: one tuple per step; its meaning is the sampler's (see ``schedule_tables``).
        alphas: alpha-bar at each step's timestep.
    """

    name: str
    timesteps: tuple[int, ...]
    coefficients: tuple[tuple[float, ...], ...]
    alphas: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.timesteps)


@dataclass(frozen=True)
class NoiseSchedule:
    """A DDPM training schedule, with diffusers' ``DDIMScheduler`` config names and SD defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    set_alpha_to_one: bool = False
    steps_offset: int = 1
    timestep_spacing: str = "leading"
    prediction_type: str = "epsilon"
    clip_sample: bool = False
    thresholding: bool = False

    def __post_init__(self) -> None:
        if self.clip_sample or self.thresholding:
            raise FeatInvError("clip_sample and thresholding must be False (latent diffusion samples are unbounded)")
        if self.prediction_type != "epsilon":
            raise FeatInvError(f"prediction_type must be 'epsilon', got {self.prediction_type!r}")
        if self.num_train_timesteps < 1:
            raise FeatInvError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, config: Any, where: str = "noise_schedule") -> NoiseSchedule:
        """From our own dict or a diffusers scheduler config (unknown keys are ignored), each known
        field checked: a FeatInvError naming ``where``, the field, its value and what was expected."""
        if not isinstance(config, dict):
            raise FeatInvError(f"{where} must be an object, got {type(config).__name__}")
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in names}
        for name, value in values.items():
            expected = _FIELD_CHECKS[name]
            if not expected[0](value):
                raise FeatInvError(f"{where}: {name} must be {expected[1]}, got {value!r}")
        schedule = cls(**values)
        if schedule.beta_schedule != "squaredcos_cap_v2" and not schedule.beta_start < schedule.beta_end:
            raise FeatInvError(
                f"{where}: beta_start must be below beta_end, got {schedule.beta_start}, {schedule.beta_end}"
            )
        if schedule.steps_offset >= schedule.num_train_timesteps:
            raise FeatInvError(f"{where}: steps_offset must be below num_train_timesteps, got {schedule.steps_offset}")
        return schedule

    def alphas_cumprod(self, impl: str | None = None) -> list[float]:
        tables = schedule_tables(impl)
        betas = tables.betas(self.num_train_timesteps, self.beta_start, self.beta_end, self.beta_schedule)
        return list(tables.alphas_cumprod(betas))

    @property
    def max_steps(self) -> int:
        """The most sampler steps this schedule gives distinct timesteps for (both samplers)."""
        return max(1, self.num_train_timesteps - 1)

    def check_steps(self, num_steps: int) -> None:
        """Raise ``FeatInvError`` unless ``num_steps`` is an integer in [1, :attr:`max_steps`]."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= self.max_steps:
            raise FeatInvError(f"steps must be an integer in [1, {self.max_steps}], got {num_steps!r}")

    def ddim(self, num_steps: int, eta: float = 0.0, impl: str | None = None) -> SamplerSchedule:
        """DDIM tables: ``(sqrt(1-a_t), sqrt(a_t), sqrt(a_prev), sqrt(1-a_prev-std^2), std)`` per step."""
        self.check_steps(num_steps)
        if not 0.0 <= float(eta) <= 1.0:
            raise FeatInvError(f"eta must be in [0, 1], got {eta}")
        tables = schedule_tables(impl)
        alphas = self.alphas_cumprod(impl)
        steps = list(
            tables.ddim_timesteps(self.num_train_timesteps, num_steps, self.timestep_spacing, self.steps_offset)
        )
        try:
            flat = tables.ddim_coefficients(alphas, steps, self.num_train_timesteps, self.set_alpha_to_one, float(eta))
        except ValueError as error:
            raise FeatInvError(f"steps={num_steps}: {error}") from error
        return _schedule("ddim", steps, flat, 5, alphas)

    def for_sampler(self, sampler: str, num_steps: int, eta: float = 0.0) -> SamplerSchedule:
        """The tables of ``sampler`` (``ddim``, ``dpmpp`` or ``lcm``) for ``num_steps`` steps."""
        if sampler == "ddim":
            return self.ddim(num_steps, eta)
        if sampler == "dpmpp":
            return self.dpmpp_2m(num_steps)
        if sampler == "lcm":
            return self.lcm(num_steps)
        raise FeatInvError(f"sampler must be one of ddim, dpmpp, lcm, got {sampler!r}")

    def lcm(self, num_steps: int, skip: int = LCM_SKIP) -> SamplerSchedule:
        """The few-step sampler of a consistency-distilled model (latent consistency models, Luo et al.
        2023; diffusers' ``LCMScheduler``): at each timestep predict x0, then noise it afresh to the
        next timestep, ``x_next = sqrt(a_next) x0 + sqrt(1 - a_next) z``; the last step returns x0.

        Timesteps are those of ``LCMScheduler`` over the distillation's grid of ``skip``-apart
        timesteps (``skip - 1, 2 skip - 1, ..., T - 1``): every ``len(grid) // num_steps``-th from the
        top (4 steps: 999, 759, 499, 259). The rows are DDIM's layout ``(sqrt(1-a_t), sqrt(a_t),
        sqrt(a_next), 0, sqrt(1-a_next))``, so the DDIM loop runs them (``z`` per image, seeded).
        """
        grid = list(range(skip - 1, self.num_train_timesteps, skip))
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= len(grid):
            raise FeatInvError(f"steps must be an integer in [1, {len(grid)}] for the lcm sampler, got {num_steps!r}")
        steps = [grid[::-1][len(grid) * i // num_steps] for i in range(num_steps)]
        alphas = self.alphas_cumprod()
        rows = []
        for i, t in enumerate(steps):
            alpha, alpha_next = alphas[t], alphas[steps[i + 1]] if i + 1 < len(steps) else 1.0
            rows.append((math.sqrt(1 - alpha), math.sqrt(alpha), math.sqrt(alpha_next), 0.0, math.sqrt(1 - alpha_next)))
        return SamplerSchedule("lcm", tuple(steps), tuple(rows), tuple(alphas[t] for t in steps))

    def dpmpp_2m_at(self, timesteps: list[int]) -> SamplerSchedule:
        """DPM-Solver++(2M) over the given strictly decreasing ``timesteps``, ending at the clean
        image (e.g. the rest of a trajectory from an intermediate t)."""
        try:
            flat = schedule_tables().dpmpp_2m_coefficients(self.alphas_cumprod(), list(timesteps))
        except ValueError as error:
            raise FeatInvError(f"timesteps {list(timesteps)}: {error}") from error
        return _schedule("dpmpp_2m", list(timesteps), flat, 5, self.alphas_cumprod())

    def dpmpp_2m(self, num_steps: int, timestep_spacing: str = "linspace", impl: str | None = None) -> SamplerSchedule:
        """DPM-Solver++(2M) tables: ``(a_x, a_eps, c_x, c_d0, c_d1)`` per step.

        ``timestep_spacing`` defaults to ``linspace``, the default of diffusers'
        ``DPMSolverMultistepScheduler``.
        """
        self.check_steps(num_steps)
        tables = schedule_tables(impl)
        alphas = self.alphas_cumprod(impl)
        steps = list(tables.dpmpp_timesteps(self.num_train_timesteps, num_steps, timestep_spacing, self.steps_offset))
        try:
            flat = tables.dpmpp_2m_coefficients(alphas, steps)
        except ValueError as error:
            raise FeatInvError(f"steps={num_steps}: {error}") from error
        return _schedule("dpmpp_2m", steps, flat, 5, alphas)


def _is_int(low: int, high: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _is_probability(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 < v < 1.0


_FIELD_CHECKS = {
    "num_train_timesteps": (_is_int(1, 100_000), "an integer in [1, 100000]"),
    "beta_start": (_is_probability, "a number in (0, 1)"),
    "beta_end": (_is_probability, "a number in (0, 1)"),
    "beta_schedule": (lambda v: v in BETA_SCHEDULES, f"one of {', '.join(BETA_SCHEDULES)}"),
    "set_alpha_to_one": (lambda v: isinstance(v, bool), "true or false"),
    "steps_offset": (_is_int(0, 99_999), "an integer >= 0"),
    "timestep_spacing": (lambda v: v in TIMESTEP_SPACINGS, f"one of {', '.join(TIMESTEP_SPACINGS)}"),
    "prediction_type": (lambda v: v == "epsilon", "'epsilon'"),
    "clip_sample": (lambda v: v is False, "false (latent diffusion samples are unbounded)"),
    "thresholding": (lambda v: v is False, "false"),
}


def _schedule(name: str, steps: list[int], flat: list[float], width: int, alphas: list[float]) -> SamplerSchedule:
    rows = tuple(tuple(flat[i * width : (i + 1) * width]) for i in range(len(steps)))
    return SamplerSchedule(name, tuple(int(t) for t in steps), rows, tuple(alphas[t] for t in steps))
