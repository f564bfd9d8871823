"""Step spacings: where along the noise levels a sampler evaluates the denoiser.

Every spacing is a plain function ``spacing(train_sigmas, steps, **options) -> Tensor[steps]``
that returns ``steps`` decreasing noise levels (the final 0 is appended by :func:`make_sigmas`).
``train_sigmas`` is the increasing table of the schedule's training noise levels,
``train_sigmas[t] = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` for ``t = 0 .. T-1``; fractional
timesteps are interpolated linearly in ``log sigma``, the same rule the denoiser uses.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch import Tensor


def _check_steps(train_sigmas: Tensor, steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"sampler.steps must be an integer >= 1, got {steps!r}")
    if steps > len(train_sigmas):
        raise ValueError(
            f"sampler.steps={steps} is more than the schedule's {len(train_sigmas)} training timesteps; "
            f"use sampler.steps <= {len(train_sigmas)}"
        )


def t_to_sigma(train_sigmas: Tensor, t: Tensor) -> Tensor:
    """Noise level at (fractional) timestep ``t``: linear interpolation of ``log sigma``."""
    log_sigmas = train_sigmas.double().log()
    t = t.double().clamp(0, len(train_sigmas) - 1)
    low = t.floor().long().clamp(max=len(train_sigmas) - 2)
    frac = t - low
    return ((1 - frac) * log_sigmas[low] + frac * log_sigmas[low + 1]).exp()


def sigma_to_t(train_sigmas: Tensor, sigma: Tensor, log_sigmas: Tensor | None = None) -> Tensor:
    """Inverse of :func:`t_to_sigma` (fractional timestep of a noise level), clamped to ``[0, T-1]``.

    ``log_sigmas``: ``train_sigmas.double().log()`` on ``sigma``'s device, when the caller keeps it.
    """
    if log_sigmas is None:
        log_sigmas = train_sigmas.double().log().to(sigma.device)
    log_sigma = sigma.double().clamp(min=1e-30).log()
    idx = torch.searchsorted(log_sigmas, log_sigma.contiguous()).clamp(1, len(log_sigmas) - 1)
    low, high = log_sigmas[idx - 1], log_sigmas[idx]
    frac = ((log_sigma - low) / (high - low)).clamp(0, 1)
    return idx - 1 + frac


def trailing(train_sigmas: Tensor, steps: int) -> Tensor:
    """Uniform in t, always starting at the last (noisiest) training step.

    "Common Diffusion Noise Schedules and Sample Steps are Flawed" (Lin et al. 2024), Table 2:
    the 'leading' spacing of the DDIM code base never visits t = T-1 and so starts sampling from
    a noise level the model was not trained to start from; 'trailing' does.
    """
    _check_steps(train_sigmas, steps)
    num_timesteps = len(train_sigmas)
    t = torch.round(torch.arange(num_timesteps, 0, -num_timesteps / steps, dtype=torch.float64)) - 1
    return train_sigmas.double()[t.long()]


def quadratic(train_sigmas: Tensor, steps: int) -> Tensor:
    """Quadratic in t (DDIM, Song et al. 2021, Appendix D.2), trailing: dense near t = 0."""
    _check_steps(train_sigmas, steps)
    frac = torch.arange(steps, 0, -1, dtype=torch.float64) / steps
    return t_to_sigma(train_sigmas, (len(train_sigmas) - 1) * frac**2)


def karras(
    train_sigmas: Tensor,
    steps: int,
    rho: float = 7.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    """EDM spacing (Karras et al. 2022, Eq. 5): uniform in ``sigma^(1/rho)``."""
    _check_steps(train_sigmas, steps)
    if rho <= 0:
        raise ValueError(f"sampler.rho must be > 0, got {rho}")
    lo = float(train_sigmas[0] if sigma_min is None else sigma_min)
    hi = float(train_sigmas[-1] if sigma_max is None else sigma_max)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def logsnr(train_sigmas: Tensor, steps: int, sigma_min: float | None = None, sigma_max: float | None = None) -> Tensor:
    """Uniform in log-SNR = -2 log sigma (the DPM-Solver 'logSNR' spacing, Lu et al. 2022, Sec. 3.3)."""
    _check_steps(train_sigmas, steps)
    lo = float(train_sigmas[0] if sigma_min is None else sigma_min)
    hi = float(train_sigmas[-1] if sigma_max is None else sigma_max)
    return torch.linspace(math.log(hi), math.log(lo), steps, dtype=torch.float64).exp()


SPACINGS: dict[str, Callable[..., Tensor]] = {
    "trailing": trailing,
    "quadratic": quadratic,
    "karras": karras,
    "logsnr": logsnr,
}


def make_sigmas(
    train_sigmas: Tensor, steps: int, spacing: str = "trailing", dtype: torch.dtype = torch.float32, **options
) -> Tensor:
    """``steps + 1`` decreasing noise levels ending in 0, by the named spacing."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown sampler.spacing={spacing!r}; choose one of: {', '.join(sorted(SPACINGS))}")
    known = {name for fn in SPACINGS.values() for name in inspect.signature(fn).parameters} - {"train_sigmas", "steps"}
    if set(options) - known:
        raise ValueError(f"unknown spacing option(s) {sorted(set(options) - known)}; known: {', '.join(sorted(known))}")
    # An option of another spacing (rho from a karras config after sampler.spacing=logsnr) does not apply here.
    accepted = inspect.signature(SPACINGS[spacing]).parameters
    sigmas = SPACINGS[spacing](train_sigmas, steps, **{k: v for k, v in options.items() if k in accepted})
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)
