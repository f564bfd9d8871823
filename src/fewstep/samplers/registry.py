"""The sampler registry: name -> function, the same names as ``conf/sampler/*.yaml``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

SAMPLERS: dict[str, Callable[..., Tensor]] = {}


def register(name: str) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Add a sampler to :data:`SAMPLERS` under ``name``."""

    def add(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} is registered twice")
        SAMPLERS[name] = fn
        return fn

    return add


def get_sampler(name: str) -> Callable[..., Tensor]:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name]


def check_sigmas(sigmas: Tensor, x: Tensor) -> Tensor:
    """Validate a sampling grid and move it to ``x``'s device and dtype."""
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError("sigmas must be a 1-D tensor of at least 2 noise levels ending in 0")
    if not bool((sigmas[:-1] > sigmas[1:]).all()):
        raise ValueError("sigmas must be strictly decreasing (largest noise first); check the spacing")
    if float(sigmas[-1]) < 0 or float(sigmas[-2]) <= 0:
        raise ValueError("sigmas must be positive except for a final 0")
    return sigmas.to(device=x.device, dtype=x.dtype)


def noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)


def batch_sigma(sigma: Tensor, x: Tensor) -> Tensor:
    """The ``[batch]``-shaped noise level the contract promises every denoiser call."""
    return sigma.expand(x.shape[0])
