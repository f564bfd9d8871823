"""Stochastic samplers: reverse-time SDEs and Langevin dynamics in the VE form x = x0 + sigma * n.

With the score ``grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2`` (Tweedie / EDM Eq. 3) the
family of reverse SDEs sharing the PF-ODE's marginals (EDM, Karras et al. 2022, Eq. 6) reads, in
``lambda = -log sigma``,

    dx = (1 + eta) (D(x, sigma) - x) d lambda + sqrt(2 eta) sigma dW_lambda,

eta = 0 the PF-ODE, eta = 1 the reverse SDE of Song et al. 2021 (Eq. 6, VE). ``denoise_to_zero``
decides what the final step to sigma = 0 returns: the denoiser output (the noise-free mean, as
Song et al.'s ``denoise`` and NCSNv2 do) or, when False, the sample at the last positive noise level,
with one network call saved (NCSN's Algorithm 1 returns that).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fewstep.samplers.multistep import _step_order
from fewstep.samplers.registry import batch_sigma, check_sigmas, noise_like, register


@register("dpmpp_2m_sde")
@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    cond: dict | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    lower_order_final: bool = True,
) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, Appendix; Gonzalez et al. 2023): the SDE above solved
    exactly for a denoiser extrapolated linearly in lambda from the last two outputs.

    With ``k = (1 + eta) h``: ``x' = (sigma'/sigma) e^{-eta h} x + (1 - e^{-k}) D_i
    + (1 - (1 - e^{-k}) / k) (D_i - D_{i-1}) / r + sigma' sqrt(1 - e^{-2 eta h}) z``. eta = 1 and a
    first-order step is exactly DDPM's ancestral step; eta = 0 is a deterministic 2M solver.
    """
    if eta < 0 or s_noise < 0:
        raise ValueError(f"sampler.eta and sampler.s_noise must be >= 0, got {eta} and {s_noise}")
    sigmas = check_sigmas(sigmas, x)
    s, steps = sigmas.tolist(), len(sigmas) - 1
    old, h_old = None, 0.0
    for i in range(steps):
        denoised = denoiser(x, batch_sigma(sigmas[i], x), **(cond or {}))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised})
        if s[i + 1] == 0:
            x = denoised
            continue
        h = math.log(s[i] / s[i + 1])
        k = (1 + eta) * h
        x = (s[i + 1] / s[i]) * math.exp(-eta * h) * x - math.expm1(-k) * denoised
        if old is not None and _step_order(i, steps, 2, lower_order_final) == 2:
            x = x + (1 + math.expm1(-k) / k) * (h / h_old) * (denoised - old)
        if eta > 0:
            x = x + s[i + 1] * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise * noise_like(x, generator)
        old, h_old = denoised, h
    return x


@register("euler_maruyama")
@torch.no_grad()
def sample_euler_maruyama(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    cond: dict | None = None,
    denoise_to_zero: bool = True,
) -> Tensor:
    """Euler-Maruyama on the reverse VE SDE (Song et al. 2021, Eq. 6) in time log sigma:
    ``x' = x + 2 dt (D - x) + sigma sqrt(2 dt) z``, ``dt = log(sigma / sigma')``.

    On a geometric grid this is exactly their ``EulerMaruyamaPredictor`` for the VE SDE
    (sigma(t) = sigma_min (sigma_max / sigma_min)^t). First order weakly; needs many steps
    (2 dt < 1, i.e. sigma'/sigma > 0.61, for the drift step not to overshoot).
    """
    sigmas = check_sigmas(sigmas, x)
    s, steps = sigmas.tolist(), len(sigmas) - 1
    for i in range(steps):
        if s[i + 1] == 0 and not denoise_to_zero:
            break
        denoised = denoiser(x, batch_sigma(sigmas[i], x), **(cond or {}))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised})
        if s[i + 1] == 0:
            x = denoised
            continue
        dt = math.log(s[i] / s[i + 1])
        x = x + 2 * dt * (denoised - x) + s[i] * math.sqrt(2 * dt) * noise_like(x, generator)
    return x


@register("pc")
@torch.no_grad()
def sample_pc(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    cond: dict | None = None,
    snr: float = 0.16,
    n_corrector: int = 1,
    denoise_to_zero: bool = True,
) -> Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Algorithm 2, VE SDE).

    In the order of their code: at each level, ``n_corrector`` Langevin steps (their Algorithm 4,
    VE: alpha = 1) with step size ``2 (snr ||z|| / ||score||)^2``, then the reverse-diffusion
    predictor (their App. E) to the next level:
    ``x' = x + (sigma^2 - sigma'^2) score + sqrt(sigma^2 - sigma'^2) z``. Cost: (n_corrector + 1)
    calls per level. As in their code the norms are batch means of per-sample norms: per-sample
    ratios blow the step up wherever the score nearly vanishes (between modes, in low dimension).
    """
    if snr <= 0 or not isinstance(n_corrector, int) or n_corrector < 0:
        raise ValueError(f"need sampler.snr > 0 and an integer sampler.n_corrector >= 0, got {snr}, {n_corrector}")
    sigmas = check_sigmas(sigmas, x)
    s, steps = sigmas.tolist(), len(sigmas) - 1
    for i in range(steps):
        sigma = batch_sigma(sigmas[i], x)
        for _ in range(n_corrector):
            score = (denoiser(x, sigma, **(cond or {})) - x) / s[i] ** 2
            z = noise_like(x, generator)
            step = 2 * float(snr * z.flatten(1).norm(dim=1).mean() / score.flatten(1).norm(dim=1).mean()) ** 2
            x = x + step * score + math.sqrt(2 * step) * z
        if s[i + 1] == 0 and not denoise_to_zero:
            break
        denoised = denoiser(x, sigma, **(cond or {}))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised})
        ratio = s[i + 1] ** 2 / s[i] ** 2
        x = denoised + ratio * (x - denoised)
        if s[i + 1] > 0:
            x = x + math.sqrt(s[i] ** 2 - s[i + 1] ** 2) * noise_like(x, generator)
    return x


@register("annealed_langevin")
@torch.no_grad()
def sample_annealed_langevin(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    cond: dict | None = None,
    n_steps_each: int = 10,
    step_lr: float = 2e-5,
    denoise_to_zero: bool = True,
) -> Tensor:
    """Annealed Langevin dynamics (NCSN, Song & Ermon 2019, Algorithm 1).

    At every positive level sigma_i, ``n_steps_each`` steps ``x + (a/2) score + sqrt(a) z`` with
    ``a = step_lr * sigma_i^2 / sigma_L^2`` (sigma_L the smallest level); then, for a grid ending
    in 0, one denoising step (Jolicoeur-Martineau et al. 2021; NCSNv2, Song & Ermon 2020).
    Cost: levels * n_steps_each (+ 1) calls. NCSN used step_lr = 2e-5 with sigma_L = 0.01.
    """
    if step_lr <= 0 or not isinstance(n_steps_each, int) or n_steps_each < 1:
        raise ValueError(
            f"need sampler.step_lr > 0 and an integer sampler.n_steps_each >= 1, got {step_lr}, {n_steps_each}"
        )
    sigmas = check_sigmas(sigmas, x)
    levels = [v for v in sigmas.tolist() if v > 0]
    for i, level in enumerate(levels):
        sigma = batch_sigma(sigmas[i], x)
        alpha = step_lr * level**2 / levels[-1] ** 2
        for _ in range(n_steps_each):
            denoised = denoiser(x, sigma, **(cond or {}))
            x = x + (alpha / 2) * (denoised - x) / level**2 + math.sqrt(alpha) * noise_like(x, generator)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised})
    if float(sigmas[-1]) == 0 and denoise_to_zero:
        x = denoiser(x, batch_sigma(sigmas[-2], x), **(cond or {}))
    return x
