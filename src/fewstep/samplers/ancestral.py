"""DDPM and DDIM, in the variance-exploding form x = x0 + sigma * n.

With ``abar = 1 / (1 + sigma^2)`` the DDPM posterior q(x_{t-1} | x_t, x0) (Ho et al. 2020, Eqs. 6-7)
becomes, between noise levels sigma (now) and sigma' (next),

    mean = x0 + (sigma'^2 / sigma^2) (x - x0),   var = sigma'^2 (sigma^2 - sigma'^2) / sigma^2,

and DDIM (Song et al. 2021, Eq. 12) with ``sigma_eta = eta * sqrt(var)`` moves to
``x0 + sqrt(sigma'^2 - sigma_eta^2) * eps_hat + sigma_eta * z``: eta = 1 is DDPM's ancestral
step with the beta-tilde variance, eta = 0 is the deterministic DDIM (an Euler step of the
probability-flow ODE in sigma).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fewstep.samplers.registry import batch_sigma, check_sigmas, noise_like, register, runs_upward


@register("ddpm")
@torch.no_grad()
def sample_ddpm(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    variance: str = "beta_tilde",
    cond: dict | None = None,
) -> Tensor:
    """Ancestral sampling of DDPM (Ho et al. 2020, Algorithm 2) over the given noise levels.

    ``variance`` is the reverse-step variance: ``beta_tilde`` (the posterior variance, Eq. 7) or
    ``beta`` (the forward step's, sigma_t^2 = beta_t in Sec. 3.2). Between two grid points the
    "beta" of the skipped span is ``1 - abar_t / abar_s``. No noise is added on the last step.
    """
    if variance not in ("beta_tilde", "beta"):
        raise ValueError(f"sampler.variance must be 'beta_tilde' or 'beta', got {variance!r}")
    sigmas = check_sigmas(sigmas, x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, batch_sigma(sigma, x), **(cond or {}))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_next": sigma_next, "denoised": x0})
        x = x0 + (sigma_next**2 / sigma**2) * (x - x0)
        if sigma_next > 0:
            if variance == "beta_tilde":
                var = sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2
            else:  # beta_t / abar_{t-1}, written with sigmas: (sigma^2 - sigma'^2)(1 + sigma'^2) / (1 + sigma^2)
                var = (sigma**2 - sigma_next**2) * (1 + sigma_next**2) / (1 + sigma**2)
            x = x + var.sqrt() * noise_like(x, generator)
    return x


@register("ddim")
@torch.no_grad()
def sample_ddim(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    eta: float = 0.0,
    cond: dict | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, Eq. 12): deterministic for ``eta = 0``, DDPM-ancestral for ``eta = 1``."""
    if eta < 0:
        raise ValueError(f"sampler.eta must be >= 0, got {eta}")
    sigmas = check_sigmas(sigmas, x, upward=True)
    if eta > 0 and runs_upward(sigmas):
        raise ValueError("sampler.eta must be 0 on an increasing (inversion) grid: DDIM inversion is deterministic")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, batch_sigma(sigma, x), **(cond or {}))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_next": sigma_next, "denoised": x0})
        eps = (x - x0) / sigma
        if eta == 0:  # also the step of an upward (inversion) grid, where sigma' > sigma
            x = x0 + sigma_next * eps
            continue
        sigma_up = (eta * sigma_next * (sigma**2 - sigma_next**2).sqrt() / sigma).clamp(max=sigma_next)
        x = x0 + (sigma_next**2 - sigma_up**2).sqrt() * eps
        if sigma_next > 0:
            x = x + sigma_up * noise_like(x, generator)
    return x
