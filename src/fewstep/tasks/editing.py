"""Editing on the contract: SDEdit, probability-flow ODE inversion, and editing toward a new condition.

Everything here takes what a sampler takes: a ``denoiser(x, sigma[batch], **cond) -> x0_hat``, a
grid ``sigmas`` (decreasing, ending in 0) and a sampler (a name of :data:`fewstep.samplers.SAMPLERS`
or a function with the sampler signature). So it works for every fewstep model, for any network
wrapped as a denoiser, and with every sampler.

``strength`` in (0, 1] chooses how much of the grid an edit runs, as in diffusers' image-to-image:
the last ``round(strength * steps)`` steps (at least one), so ``strength = 1`` starts from pure noise
and a small strength stays close to the input. The network evaluations scale with it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from fewstep.samplers import get_sampler
from fewstep.samplers.registry import SampleGenerators, batch_sigma, noise_like

Sampler = str | Callable[..., Tensor]
Generator = torch.Generator | SampleGenerators | None

# The samplers whose steps integrate the probability-flow ODE in either direction of sigma, with the
# option values that keep them deterministic (anything else adds noise, which cannot be inverted).
INVERTIBLE: dict[str, dict[str, float]] = {
    "ddim": {"eta": 0.0},
    "euler": {"s_churn": 0.0},
    "heun": {"s_churn": 0.0},
    "dpmpp_2m": {},
    "dpmpp_3m": {},
    "unipc": {},
    "ipndm": {},
    "deis": {},
}


def resolve_sampler(sampler: Sampler) -> Callable[..., Tensor]:
    return get_sampler(sampler) if isinstance(sampler, str) else sampler


def check_grid(sigmas: Tensor) -> Tensor:
    """A generation grid: 1-D, strictly decreasing, positive but for a final 0."""
    if sigmas.ndim != 1 or len(sigmas) < 2 or not bool((sigmas[:-1] > sigmas[1:]).all()):
        raise ValueError("sigmas must be a strictly decreasing 1-D grid of >= 2 noise levels (the sampling grid)")
    if float(sigmas[-1]) < 0 or float(sigmas[-2]) <= 0:
        raise ValueError("sigmas must be positive except for a final 0")
    return sigmas


def start_index(steps: int, strength: float) -> int:
    """Where an edit of ``strength`` enters a grid of ``steps`` steps: it runs the last
    ``max(1, round(strength * steps))`` of them."""
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0 < strength <= 1:
        raise ValueError(
            f"strength must be in (0, 1], got {strength!r}: 1 starts from pure noise, small values stay near the input"
        )
    return steps - max(1, round(strength * steps))


@torch.no_grad()
def sdedit(
    denoiser: Callable[..., Tensor],
    image: Tensor,
    strength: float,
    sigmas: Tensor,
    *,
    sampler: Sampler = "ddim",
    generator: Generator = None,
    cond: Mapping | None = None,
    **options,
) -> Tensor:
    """SDEdit (Meng et al. 2022, Algorithm 1): perturb the input to a noise level, then solve the
    reverse process from there. With x = x0 + sigma n (the contract's VE form) the perturbation is
    ``x(sigma_s) = image + sigma_s z`` (their Eq. 2 in the VE SDE), ``sigma_s = sigmas[start]`` chosen by
    ``strength`` (module docstring); any sampler then runs ``sigmas[start:]``. The trade-off: larger
    strength, more realistic and less faithful to the input."""
    sigmas = check_grid(sigmas)
    start = start_index(len(sigmas) - 1, strength)
    x = image + sigmas[start].to(image) * noise_like(image, generator)
    run = resolve_sampler(sampler)
    return run(denoiser, x, sigmas[start:], generator=generator, cond=dict(cond or {}), **options)


def check_invertible(sampler: Sampler, options: Mapping) -> None:
    """One-line errors for a sampler that cannot run the ODE upwards, or runs it with noise."""
    if not isinstance(sampler, str):
        return  # a user's function: it must accept an increasing grid itself
    if sampler not in INVERTIBLE:
        raise ValueError(
            f"sampler {sampler!r} is stochastic or integrates downwards only and cannot invert; "
            f"use a deterministic ODE sampler: {', '.join(INVERTIBLE)}"
        )
    for key, value in INVERTIBLE[sampler].items():
        if options.get(key, value) != value:
            raise ValueError(
                f"{sampler} with {key}={options[key]} adds noise and cannot invert; set sampler.{key}={value}"
            )


@torch.no_grad()
def invert(
    denoiser: Callable[..., Tensor],
    image: Tensor,
    sigmas: Tensor,
    *,
    sampler: Sampler = "ddim",
    cond: Mapping | None = None,
    strength: float = 1.0,
    **options,
) -> Tensor:
    """Deterministic inversion: the probability-flow ODE run from the data to noise.

    Returns the latent at ``sigmas[start]`` (``sigmas[0]`` for ``strength = 1``) from which the same
    sampler on ``sigmas[start:]`` regenerates ``image`` up to the solver's ODE error. DDIM inversion
    (Song et al. 2021, Sec. 4.3; Mokady et al. 2023) is ``sampler="ddim"``; DPM-Solver++, UniPC,
    Heun and iPNDM run their own steps backwards, at their own order.

    A grid ending in 0 starts with the leg from sigma = 0 to the smallest positive level
    ``sigma_1``: the ODE is ``dx/dsigma = (x - D(x, sigma)) / sigma``, whose Euler step with the
    slope taken at ``(image, sigma_1)`` gives ``x(sigma_1) = image + (image - D(image, sigma_1))``;
    that makes the generator's last step ``D(x(sigma_1), sigma_1)`` return ``image`` to first
    order in the step. The leg costs one network evaluation: inversion costs what generation does.
    """
    check_invertible(sampler, options)
    sigmas = check_grid(sigmas)
    start = start_index(len(sigmas) - 1, strength)
    levels = sigmas[start:]
    cond = dict(cond or {})
    x = image
    if float(levels[-1]) == 0:
        levels = levels[:-1]
        lowest = levels[-1].to(image)
        x = image + (image - denoiser(image, batch_sigma(lowest, image), **cond))
    if len(levels) > 1:
        x = resolve_sampler(sampler)(denoiser, x, levels.flip(0), cond=cond, **options)
    return x


@torch.no_grad()
def edit(
    denoiser: Callable[..., Tensor],
    image: Tensor,
    sigmas: Tensor,
    *,
    source: Mapping,
    target: Mapping,
    strength: float = 1.0,
    sampler: Sampler = "ddim",
    target_denoiser: Callable[..., Tensor] | None = None,
    **options,
) -> Tensor:
    """Edit toward a new condition ("turn this 3 into an 8"): invert the image with its ``source``
    condition, then generate from that latent with the ``target`` one (inversion-based editing, as
    in Mokady et al. 2023 without their null-text optimisation).

    ``source`` / ``target`` are the conditions a denoiser takes (``{"y": labels}``, text tensors).
    ``target_denoiser`` (e.g. the classifier-free-guided one) generates; the inversion uses the plain
    ``denoiser``, because a guided ODE does not invert stably. ``strength < 1`` inverts only part of
    the way: the result keeps more of the input's layout.
    """
    sigmas = check_grid(sigmas)
    latent = invert(denoiser, image, sigmas, sampler=sampler, cond=source, strength=strength, **options)
    start = start_index(len(sigmas) - 1, strength)
    run = resolve_sampler(sampler)
    return run(target_denoiser or denoiser, latent, sigmas[start:], cond=dict(target), **options)
