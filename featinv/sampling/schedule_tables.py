"""Noise-schedule tables in double precision: the pure-Python twin of ``featinv._C``.

Each function performs the same floating-point operations, in the same order, as its C++
counterpart in ``csrc/schedule_tables.cpp``; ``tests/test_schedule_tables.py`` checks that both
agree and that both match diffusers' ``DDIMScheduler`` and ``DPMSolverMultistepScheduler``.
"""

from __future__ import annotations

import math

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_SPACINGS = ("leading", "trailing", "linspace")


def _linspace_at(start: float, stop: float, num: int, i: int) -> float:
    """Element ``i`` of ``numpy.linspace(start, stop, num)``."""
    if num == 1:
        return start
    if i == num - 1:
        return stop
    step = (stop - start) / float(num - 1)
    return start + float(i) * step


def _cosine_alpha_bar(t: float) -> float:
    c = math.cos((t + 0.008) / 1.008 * math.pi / 2.0)
    return c * c


def _require_positive(value: int, name: str) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1")


def _trailing(start: int, step: float, shift: int) -> list[int]:
    """``numpy.arange(start, 0, -step).round() + shift``."""
    first = float(start)
    length = math.ceil((0.0 - first) / -step)
    delta = (first + -step) - first
    return [round(first if i == 0 else first + float(i) * delta) + shift for i in range(length)]


def _alpha_at(alphas_cumprod: list[float], t: int) -> float:
    """``alphas_cumprod[t]``, with an error naming ``t`` when it is outside the training range."""
    if not 0 <= t < len(alphas_cumprod):
        raise ValueError(f"timestep {t} is outside [0, {len(alphas_cumprod)}); use fewer steps or another spacing")
    return alphas_cumprod[t]


def _check_steps(num_train_timesteps: int, num_steps: int, spacing: str) -> None:
    _require_positive(num_steps, "num_steps")
    if num_steps > num_train_timesteps:
        raise ValueError("num_steps must be <= num_train_timesteps")
    if spacing not in _SPACINGS:
        raise ValueError(f"timestep_spacing must be leading, trailing or linspace, got {spacing}")


def betas(num_train_timesteps: int, beta_start: float, beta_end: float, schedule: str) -> list[float]:
    """Training betas, length ``num_train_timesteps``."""
    _require_positive(num_train_timesteps, "num_train_timesteps")
    if schedule not in _BETA_SCHEDULES:
        raise ValueError(f"beta_schedule must be linear, scaled_linear or squaredcos_cap_v2, got {schedule}")
    n = num_train_timesteps
    if schedule == "linear":
        return [_linspace_at(beta_start, beta_end, n, i) for i in range(n)]
    if schedule == "scaled_linear":
        roots = [_linspace_at(math.sqrt(beta_start), math.sqrt(beta_end), n, i) for i in range(n)]
        return [root * root for root in roots]
    return [
        min(1.0 - _cosine_alpha_bar(float(i + 1) / float(n)) / _cosine_alpha_bar(float(i) / float(n)), 0.999)
        for i in range(n)
    ]


def alphas_cumprod(betas: list[float]) -> list[float]:
    """Cumulative product of ``1 - beta``."""
    out, product = [], 1.0
    for beta in betas:
        product *= 1.0 - beta
        out.append(product)
    return out


def ddim_timesteps(num_train_timesteps: int, num_steps: int, spacing: str, steps_offset: int) -> list[int]:
    """DDIM inference timesteps, descending, as diffusers' ``DDIMScheduler.set_timesteps``."""
    _check_steps(num_train_timesteps, num_steps, spacing)
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        return [i * ratio + steps_offset for i in range(num_steps - 1, -1, -1)]
    if spacing == "trailing":
        return _trailing(num_train_timesteps, float(num_train_timesteps) / float(num_steps), -1)
    last = float(num_train_timesteps - 1)
    return [round(_linspace_at(0.0, last, num_steps, i)) for i in range(num_steps - 1, -1, -1)]


def dpmpp_timesteps(num_train_timesteps: int, num_steps: int, spacing: str, steps_offset: int) -> list[int]:
    """DPM-Solver multistep timesteps, descending, as diffusers' ``DPMSolverMultistepScheduler``."""
    _check_steps(num_train_timesteps, num_steps, spacing)
    if spacing == "linspace":
        last = float(num_train_timesteps - 1)
        return [round(_linspace_at(0.0, last, num_steps + 1, i)) for i in range(num_steps, 0, -1)]
    if spacing == "leading":
        ratio = num_train_timesteps // (num_steps + 1)
        return [i * ratio + steps_offset for i in range(num_steps, 0, -1)]
    return _trailing(num_train_timesteps, float(num_train_timesteps) / float(num_steps), -1)


def ddim_coefficients(
    alphas_cumprod: list[float],
    timesteps: list[int],
    num_train_timesteps: int,
    set_alpha_to_one: bool,
    eta: float,
) -> list[float]:
    """DDIM coefficients, flattened ``(num_steps, 5)``, in diffusers' order of operations.

    Columns ``sqrt(1-a_t), sqrt(a_t), sqrt(a_prev), sqrt(1-a_prev-std^2), std``:
    ``x0 = (x - c0*eps) / c1`` and ``x_prev = c2*x0 + c3*eps + std*z``.
    """
    if not alphas_cumprod:
        raise ValueError("alphas_cumprod must not be empty")
    if not timesteps:
        raise ValueError("timesteps must not be empty")
    stride = num_train_timesteps // len(timesteps)
    final_alpha = 1.0 if set_alpha_to_one else alphas_cumprod[0]
    out: list[float] = []
    for t in timesteps:
        prev = t - stride
        a_t = _alpha_at(alphas_cumprod, t)
        a_prev = _alpha_at(alphas_cumprod, prev) if prev >= 0 else final_alpha
        variance = ((1.0 - a_prev) / (1.0 - a_t)) * (1.0 - a_t / a_prev)
        std_dev = eta * math.sqrt(variance)
        out += [
            math.sqrt(1.0 - a_t),
            math.sqrt(a_t),
            math.sqrt(a_prev),
            math.sqrt(1.0 - a_prev - std_dev * std_dev),
            std_dev,
        ]
    return out


def dpmpp_2m_coefficients(alphas_cumprod: list[float], timesteps: list[int]) -> list[float]:
    """DPM-Solver++(2M) coefficients, flattened ``(num_steps, 5)``: ``a_x, a_eps, c_x, c_d0, c_d1``.

    ``x0 = a_x*x + a_eps*eps`` and ``x_next = c_x*x + c_d0*x0 + c_d1*x0_prev``.
    """
    n = len(timesteps)
    if any(timesteps[i] >= timesteps[i - 1] for i in range(1, n)):
        raise ValueError("timesteps must be strictly decreasing; use fewer steps")
    alpha, sigma, lam = [0.0] * (n + 1), [0.0] * (n + 1), [0.0] * (n + 1)
    for i, t in enumerate(timesteps):
        a = _alpha_at(alphas_cumprod, t)
        ve_sigma = math.sqrt((1.0 - a) / a)
        alpha[i] = 1.0 / math.sqrt(ve_sigma * ve_sigma + 1.0)
        sigma[i] = ve_sigma * alpha[i]
        lam[i] = math.log(alpha[i]) - math.log(sigma[i])
    alpha[n], sigma[n] = 1.0, 0.0
    out: list[float] = []
    for i in range(n):
        final_step = i == n - 1
        exp_neg_h = 0.0 if final_step else math.exp(-(lam[i + 1] - lam[i]))
        a_coef = -alpha[i + 1] * (exp_neg_h - 1.0)
        c_d0, c_d1 = a_coef, 0.0
        if i > 0 and not final_step:
            r0 = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
            c_d0 = a_coef + 0.5 * a_coef / r0
            c_d1 = -0.5 * a_coef / r0
        out += [1.0 / alpha[i], -sigma[i] / alpha[i], sigma[i + 1] / sigma[i], c_d0, c_d1]
    return out
