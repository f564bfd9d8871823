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


def check_sigmas(sigmas: Tensor, x: Tensor, *, upward: bool = False) -> Tensor:
    """Validate a sampling grid and move it to ``x``'s device and dtype.

    A grid is strictly decreasing (largest noise first), positive but for a final 0. The
    probability-flow ODE samplers pass ``upward=True``: they also run a strictly increasing grid of
    positive levels, from data towards noise (inversion, ``fewstep.tasks.invert``).
    """
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError("sigmas must be a 1-D tensor of at least 2 noise levels ending in 0")
    if upward and bool((sigmas[:-1] < sigmas[1:]).all()):
        if float(sigmas[0]) <= 0:
            raise ValueError("an increasing (inversion) grid must be positive: start it at the smallest noise level")
        return sigmas.to(device=x.device, dtype=x.dtype)
    if not bool((sigmas[:-1] > sigmas[1:]).all()):
        raise ValueError("sigmas must be strictly decreasing (largest noise first); check the spacing")
    if float(sigmas[-1]) < 0 or float(sigmas[-2]) <= 0:
        raise ValueError("sigmas must be positive except for a final 0")
    return sigmas.to(device=x.device, dtype=x.dtype)


def runs_upward(sigmas: Tensor) -> bool:
    """Whether a (checked) grid goes from data towards noise: an inversion."""
    return bool(sigmas[-1] > sigmas[0])


class SampleGenerators:
    """One random stream per sample (EDM's ``StackedRandomGenerator``, Karras et al. 2022 code).

    Pass it as a sampler's ``generator``: sample i draws its start noise and every step's noise from
    its own ``torch.Generator`` seeded with ``seeds[i]``, so a seed gives the same image whatever the
    batch size or the number of processes it is drawn in.
    """

    def __init__(self, seeds: list[int], device: torch.device | str = "cpu") -> None:
        self.seeds = [int(s) for s in seeds]
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"{len(self.generators)} per-sample generators cannot draw a batch of {shape[0]}")
        return torch.stack(
            [torch.randn(shape[1:], generator=g, device=self.device, dtype=dtype) for g in self.generators]
        )


def noise_like(x: Tensor, generator: torch.Generator | SampleGenerators | None) -> Tensor:
    if isinstance(generator, SampleGenerators):
        return generator.randn(tuple(x.shape), x.dtype).to(x.device)
    return torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)


def batch_sigma(sigma: Tensor, x: Tensor) -> Tensor:
    """The ``[batch]``-shaped noise level the contract promises every denoiser call."""
    return sigma.expand(x.shape[0])
