"""Samplers aimed at sample quality (FID) rather than ODE error: Restart and gradient-estimation DDIM.

On a trained network the probability-flow ODE itself can end at a worse FID than many-step
stochastic sampling (its errors are never contracted), so the best ODE solver is not always the best
sampler. Both methods here stay cheap: Restart adds a few noise-and-resolve loops where they help
most, gradient estimation changes only how two successive noise estimates are combined.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fewstep.samplers.ode import sample_heun
from fewstep.samplers.optimize import _karras as karras_grid
from fewstep.samplers.registry import batch_sigma, check_sigmas, noise_like, register


@register("restart")
@torch.no_grad()
def sample_restart(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    cond: dict | None = None,
    restart_sigma_min: float = 0.06,
    restart_sigma_max: float = 0.30,
    restart_times: int = 2,
    restart_steps: int = 3,
) -> Tensor:
    """Restart sampling (Xu et al. 2023, "Restart sampling for improving generative processes", Alg. 1).

    Heun's method down the grid (EDM Algorithm 1); on reaching the grid level nearest
    ``restart_sigma_min`` it ``restart_times`` times adds noise back up to ``restart_sigma_max``,
    ``x <- x + sqrt(s_max^2 - s_min^2) z`` (the forward process, exact in the VE form), and solves the
    ODE down again with ``restart_steps`` Heun steps on a Karras grid. The added noise contracts the
    accumulated error (their Thm. 2) at ``2 * restart_steps`` calls per restart; the paper's
    CIFAR-10 setting is [0.06, 0.30] with 2 restarts. ``restart_times=0`` is plain Heun.
    """
    if not 0 < restart_sigma_min < restart_sigma_max:
        raise ValueError(
            "need 0 < sampler.restart_sigma_min < sampler.restart_sigma_max, "
            f"got {restart_sigma_min} and {restart_sigma_max}"
        )
    for key, value in (("restart_times", restart_times), ("restart_steps", restart_steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "restart_times" else 1):
            raise ValueError(f"sampler.{key} must be a whole number (>= 1 steps, >= 0 times), got {value!r}")
    sigmas = check_sigmas(sigmas, x)
    positive = sigmas[:-1]
    restart_at = int((positive.log() - math.log(restart_sigma_min)).abs().argmin())
    s_min = float(positive[restart_at])
    if restart_at > 0:
        x = sample_heun(denoiser, x, sigmas[: restart_at + 1], callback=callback, cond=cond)
    if restart_times > 0 and s_min < restart_sigma_max:
        loop = karras_grid(restart_sigma_max, s_min, restart_steps + 1)[:-1].to(sigmas)  # no final 0
        for _ in range(restart_times):
            x = x + math.sqrt(restart_sigma_max**2 - s_min**2) * noise_like(x, generator)
            x = sample_heun(denoiser, x, loop, cond=cond)
    # the rest of the grid, its steps numbered on from the main run's for the callback
    shifted = None if callback is None else (lambda info: callback({**info, "i": info["i"] + restart_at}))
    return sample_heun(denoiser, x, sigmas[restart_at:], callback=shifted, cond=cond)


@register("gradient_estimation")
@torch.no_grad()
def sample_gradient_estimation(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    cond: dict | None = None,
    gamma: float = 2.0,
) -> Tensor:
    """DDIM with gradient estimation (Permenter & Yuan 2024, "Interpreting and improving diffusion
    models from an optimization perspective", Algorithm 2): DDIM read as gradient descent on the
    distance to the data manifold, with the step taken along ``eps_bar = gamma eps_i + (1 - gamma)
    eps_{i-1}`` (a momentum-like correction of the estimate's error; ``gamma = 2`` in the paper):
    ``x' = x + (sigma' - sigma) eps_bar``, the first step plain DDIM. ``gamma = 1`` is DDIM.
    Deterministic and first order as an ODE solver; its point is the FID at few steps.
    """
    sigmas = check_sigmas(sigmas, x)
    s, previous = sigmas.tolist(), None
    for i in range(len(s) - 1):
        denoised = denoiser(x, batch_sigma(sigmas[i], x), **(cond or {}))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised})
        eps = (x - denoised) / s[i]
        eps_bar = eps if previous is None else gamma * eps + (1 - gamma) * previous
        x = x + (s[i + 1] - s[i]) * eps_bar
        previous = eps
    return x
