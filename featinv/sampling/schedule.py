"""The training noise schedule of a model and the per-step tables a sampler needs.

Tables are computed in double precision by ``featinv._C`` or its Python twin (``FEATINV_IMPL``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from featinv._native import schedule_tables
from featinv.errors import FeatInvError


@dataclass(frozen=True)
class SamplerSchedule:
    """Timesteps and update coefficients for one sampler run.

    Attributes:
        name: ``"ddim"`` or ``"dpmpp_2m"``.
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
    def from_dict(cls, config: dict[str, Any]) -> NoiseSchedule:
        """From our own dict or a diffusers scheduler config (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def alphas_cumprod(self, impl: str | None = None) -> list[float]:
        tables = schedule_tables(impl)
        betas = tables.betas(self.num_train_timesteps, self.beta_start, self.beta_end, self.beta_schedule)
        return list(tables.alphas_cumprod(betas))

    def check_steps(self, num_steps: int) -> None:
        """Raise ``FeatInvError`` unless ``num_steps`` is an integer in [1, num_train_timesteps]."""
        if not isinstance(num_steps, int) or not 1 <= num_steps <= self.num_train_timesteps:
            raise FeatInvError(f"steps must be an integer in [1, {self.num_train_timesteps}], got {num_steps!r}")

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


def _schedule(name: str, steps: list[int], flat: list[float], width: int, alphas: list[float]) -> SamplerSchedule:
    rows = tuple(tuple(flat[i * width : (i + 1) * width]) for i in range(len(steps)))
    return SamplerSchedule(name, tuple(int(t) for t in steps), rows, tuple(alphas[t] for t in steps))
