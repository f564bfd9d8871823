"""Multistep consistency sampling (Song et al. 2023, Algorithm 1).

A consistency model's denoiser is the consistency function f(x, sigma), which maps any point of a
probability-flow ODE trajectory to the trajectory's end x0 in one evaluation. Sampling evaluates it
at sigmas[0], then alternately re-noises the estimate to the next level tau and maps it back:
``x = x0 + sqrt(tau^2 - sigma_min^2) z``, ``x0 = f(x, tau)``. One evaluation per level.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fewstep.samplers.registry import batch_sigma, check_sigmas, noise_like, register

KARRAS_RHO = 7.0


@register("consistency")
@torch.no_grad()
def sample_consistency(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    cond: dict | None = None,
    levels: Sequence[float] | None = None,
) -> Tensor:
    """Song et al. 2023, Algorithm 1: ``x0 = f(x, sigma_0)``, then for each intermediate level tau
    ``x0 = f(x0 + sqrt(tau^2 - sigma_min^2) z, tau)``; ``sigma_min``, the smallest positive level of
    the grid, is the consistency function's boundary (where f is the identity).

    A grid of N steps costs N evaluations: at ``sigmas[0]`` and at N - 1 levels spaced as Karras
    et al. (rho = 7) strictly between ``sigmas[0]`` and ``sigma_min`` (the grid's interior levels are
    not used: its last one would be the boundary, a wasted evaluation). ``levels`` gives the
    intermediate levels explicitly instead (decreasing; their paper hand-picks them, e.g. 0.821
    for two steps on CIFAR-10)."""
    sigmas = check_sigmas(sigmas, x)
    positive = [float(s) for s in sigmas if s > 0]
    start, boundary = positive[0], positive[-1]
    if levels is None:
        count = len(sigmas) - 1
        ramp = [(i / count) for i in range(1, count)]
        lo, hi = boundary ** (1 / KARRAS_RHO), start ** (1 / KARRAS_RHO)
        taus = [(hi + r * (lo - hi)) ** KARRAS_RHO for r in ramp]
    else:
        taus = [float(v) for v in levels]
    if any(not boundary < t < start for t in taus) or any(a <= b for a, b in zip(taus, taus[1:], strict=False)):
        raise ValueError(
            f"sampler.levels must decrease strictly between the grid's smallest level {boundary:.4g} and its first "
            f"{start:.4g}, got {taus}"
        )
    path = [start, *taus]
    x0 = x
    for i, level in enumerate(path):
        if i > 0:
            x = x0 + math.sqrt(level**2 - boundary**2) * noise_like(x0, generator)
        sigma = torch.tensor(level, dtype=x.dtype, device=x.device)
        x0 = denoiser(x, batch_sigma(sigma, x), **(cond or {}))
        if callback is not None:
            following = path[i + 1] if i + 1 < len(path) else 0.0
            callback({"x": x, "i": i, "sigma": sigma, "sigma_next": following, "denoised": x0})
    return x0
