"""Euler and Heun steps of the probability-flow ODE, EDM style (Karras et al. 2022).

In the variance-exploding form the PF-ODE is (EDM Eq. 4 with sigma(t) = t, s(t) = 1)

    dx/dsigma = (x - D(x, sigma)) / sigma,

so ``d = (x - D) / sigma`` is the noise estimate. Both samplers optionally "churn" (EDM Algorithm 2,
lines 4-6): before a step at sigma in [s_tmin, s_tmax] they add fresh noise to raise the level
to ``sigma_hat = sigma (1 + gamma)``, ``gamma = min(s_churn / N, sqrt(2) - 1)``, which makes them
stochastic samplers whose error self-corrects; ``s_churn = 0`` (default) keeps them deterministic.
``s_tmax = None`` means no upper bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fewstep.samplers.registry import batch_sigma, check_sigmas, noise_like, register, runs_upward


def _churn(
    x: Tensor,
    sigma: Tensor,
    steps: int,
    s_churn: float,
    s_tmin: float,
    s_tmax: float | None,
    s_noise: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """EDM Algorithm 2, lines 4-6: x_hat = x + sqrt(sigma_hat^2 - sigma^2) * s_noise * z."""
    if s_churn < 0 or s_noise < 0:
        raise ValueError(f"sampler.s_churn and sampler.s_noise must be >= 0, got {s_churn} and {s_noise}")
    in_range = s_tmin <= float(sigma) and (s_tmax is None or float(sigma) <= s_tmax)
    gamma = min(s_churn / steps, math.sqrt(2) - 1) if in_range else 0.0
    if gamma == 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return x + (sigma_hat**2 - sigma**2).sqrt() * s_noise * noise_like(x, generator), sigma_hat


def _check_deterministic_upward(sigmas: Tensor, s_churn: float) -> None:
    if s_churn > 0 and runs_upward(sigmas):
        raise ValueError("sampler.s_churn must be 0 on an increasing (inversion) grid: churn adds noise")


@register("euler")
@torch.no_grad()
def sample_euler(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    cond: dict | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float | None = None,
    s_noise: float = 1.0,
) -> Tensor:
    """Euler's method on the PF-ODE (EDM, Karras et al. 2022, Algorithm 2 without the 2nd-order
    correction): ``x' = x + (sigma' - sigma_hat) (x - D(x, sigma_hat)) / sigma_hat``. First order.
    Without churn this is DDIM with eta = 0 (Song et al. 2021, Eq. 14)."""
    sigmas = check_sigmas(sigmas, x, upward=True)
    _check_deterministic_upward(sigmas, s_churn)
    steps = len(sigmas) - 1
    for i in range(steps):
        x, sigma_hat = _churn(x, sigmas[i], steps, s_churn, s_tmin, s_tmax, s_noise, generator)
        denoised = denoiser(x, batch_sigma(sigma_hat, x), **(cond or {}))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma_hat, "sigma_next": sigmas[i + 1], "denoised": denoised})
        x = x + (sigmas[i + 1] - sigma_hat) * (x - denoised) / sigma_hat
    return x


@register("heun")
@torch.no_grad()
def sample_heun(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    cond: dict | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float | None = None,
    s_noise: float = 1.0,
) -> Tensor:
    """Heun's 2nd-order method (EDM, Karras et al. 2022, Algorithm 2; deterministic = Algorithm 1).

    Euler predictor ``x' = x_hat + (sigma' - sigma_hat) d`` then the trapezoidal corrector
    ``x' = x_hat + (sigma' - sigma_hat) (d + d') / 2`` with ``d' = (x' - D(x', sigma')) / sigma'``;
    the last step to sigma' = 0 stays Euler (line 9), so N steps cost 2N - 1 denoiser calls.
    """
    sigmas = check_sigmas(sigmas, x, upward=True)
    _check_deterministic_upward(sigmas, s_churn)
    steps = len(sigmas) - 1
    for i in range(steps):
        sigma_next = sigmas[i + 1]
        x, sigma_hat = _churn(x, sigmas[i], steps, s_churn, s_tmin, s_tmax, s_noise, generator)
        denoised = denoiser(x, batch_sigma(sigma_hat, x), **(cond or {}))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma_hat, "sigma_next": sigma_next, "denoised": denoised})
        d = (x - denoised) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * d
        if sigma_next > 0:
            d_next = (x_next - denoiser(x_next, batch_sigma(sigma_next, x), **(cond or {}))) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * (d + d_next) / 2
        x = x_next
    return x
