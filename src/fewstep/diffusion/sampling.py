"""Run a named sampler from its config: grid, start noise, batches, NFE count.

A sampler config is flat (``conf/sampler/NAME.yaml``): ``name``, ``steps``, ``spacing``, the
spacing's options and ``dynamic_threshold`` are read here, every other key goes to the sampler
function as an option. ``spacing: optimized`` tunes the grid to the model (see
:func:`optimized_sigmas`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from fewstep.diffusion.schedules import Schedule
from fewstep.diffusion.thresholding import DynamicThreshold
from fewstep.samplers import SPACINGS, get_sampler
from fewstep.samplers.optimize import load_or_optimize, optimize_sigmas

SPACING_OPTIONS = ("rho", "sigma_min", "sigma_max")
OPTIMIZED = "optimized"
# Grids the optimized spacing starts from (it keeps the best of them as its starting point).
OPTIMIZE_FROM = ("karras", "logsnr", "quadratic")


@dataclass
class SamplerSpec:
    name: str = "ddim"
    steps: int = 50
    spacing: str = "trailing"
    spacing_options: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    dynamic_threshold: float | None = None

    @classmethod
    def from_config(cls, config: Mapping | None, **overrides) -> SamplerSpec:
        """Split a flat sampler config into the grid's and the sampler's options."""
        merged = {**dict(config or {}), **{k: v for k, v in overrides.items() if v is not None}}
        name = merged.pop("name", "ddim")
        get_sampler(name)  # fail early, with the list of valid names
        steps = merged.pop("steps", 50)
        spacing = merged.pop("spacing", "trailing")
        if spacing not in SPACINGS and spacing != OPTIMIZED:
            valid = ", ".join([*sorted(SPACINGS), OPTIMIZED])
            raise ValueError(f"unknown sampler.spacing={spacing!r}; choose one of: {valid}")
        spacing_options = {k: merged.pop(k) for k in SPACING_OPTIONS if k in merged and merged[k] is not None}
        for key in SPACING_OPTIONS:
            merged.pop(key, None)
        threshold = merged.pop("dynamic_threshold", None)
        return cls(name, steps, spacing, spacing_options, merged, threshold)

    def sigmas(self, schedule: Schedule) -> Tensor:
        """The grid of a fixed spacing (the optimized one needs a model: :func:`optimized_sigmas`)."""
        if self.spacing == OPTIMIZED:
            raise ValueError("spacing=optimized depends on the model; sample through DiffusionModel.sample")
        return schedule.sigmas(self.steps, self.spacing, dtype=torch.float64, **self.spacing_options)

    def wrap(self, denoiser: Callable[..., Tensor]) -> Callable[..., Tensor]:
        """The denoiser with this config's dynamic thresholding (Imagen), if any."""
        return DynamicThreshold(denoiser, self.dynamic_threshold) if self.dynamic_threshold else denoiser


def optimized_sigmas(
    denoiser: Callable[..., Tensor],
    schedule: Schedule,
    spec: SamplerSpec,
    shape: tuple[int, ...],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    cache_path: str | Path | None = None,
    cache_key: Mapping | None = None,
) -> Tensor:
    """The ``optimized`` spacing: the grid minimising this sampler's error to a fine-step ODE
    solution for this model (in the spirit of Align Your Steps, Sabour et al. 2024), searched from
    the best of the Karras, log-SNR and quadratic grids on a fixed batch of ``batch_size`` noises.

    The search costs hundreds of network calls, so with ``cache_path`` the grid is stored in that
    JSON file under ``cache_key`` (which must identify the weights) plus the sampler, its options,
    the steps and the shape, and computed once.
    """
    starts = [schedule.sigmas(spec.steps, s, dtype=torch.float64, **spec.spacing_options) for s in OPTIMIZE_FROM]

    def compute() -> Tensor:
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn((batch_size, *shape), generator=generator).to(device)
        return optimize_sigmas(spec.wrap(denoiser), noise, starts, spec.name, options=spec.options)

    if cache_path is None:
        return compute()
    key = {
        **dict(cache_key or {}),
        "sampler": spec.name,
        "options": spec.options,
        "dynamic_threshold": spec.dynamic_threshold,
        "steps": spec.steps,
        "spacing_options": spec.spacing_options,
        "shape": list(shape),
        "batch_size": batch_size,
    }
    return load_or_optimize(cache_path, key, compute)


class CountingDenoiser:
    """Counts network evaluations (one per call, whatever the batch)."""

    def __init__(self, denoiser: Callable[..., Tensor]) -> None:
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        self.calls += 1
        return self.denoiser(x, sigma, **cond)


@dataclass
class SampleResult:
    images: Tensor
    nfe: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return len(self.images) / self.seconds if self.seconds > 0 else math.inf


@torch.no_grad()
def generate(
    denoiser: Callable[..., Tensor],
    schedule: Schedule,
    spec: SamplerSpec,
    shape: tuple[int, ...],
    num_samples: int,
    *,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    cond: Mapping | None = None,
    progress: Callable[[int], None] | None = None,
    to_cpu: bool = True,
    sigmas: Tensor | None = None,
) -> SampleResult:
    """Draw ``num_samples`` images of ``shape`` (without batch) in batches of ``batch_size``.

    ``nfe`` is the number of network evaluations one sample needed; ``seconds`` the wall time.
    ``cond`` values with a leading batch dimension of ``num_samples`` are split with the batches.
    ``sigmas`` overrides the grid of ``spec`` (e.g. an optimized one).
    """
    if num_samples < 1:
        raise ValueError(f"number of samples must be >= 1, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sampler = get_sampler(spec.name)
    sigmas = spec.sigmas(schedule) if sigmas is None else sigmas
    counter = CountingDenoiser(spec.wrap(denoiser))
    chunks, nfe = [], 0
    start = time.perf_counter()
    for begin in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - begin)
        noise = torch.randn((n, *shape), generator=generator, device=generator.device if generator else "cpu")
        x = noise.to(device) * sigmas[0].item()
        batch_cond = {
            k: (v[begin : begin + n] if torch.is_tensor(v) and v.ndim > 0 else v) for k, v in (cond or {}).items()
        }
        counter.calls = 0
        out = sampler(
            counter, x, sigmas, generator=_device_generator(generator, device), cond=batch_cond, **spec.options
        )
        nfe = max(nfe, counter.calls)
        chunks.append(out.cpu() if to_cpu else out)
        if progress is not None:
            progress(n)
    seconds = time.perf_counter() - start
    return SampleResult(torch.cat(chunks), nfe, seconds)


def _device_generator(generator: torch.Generator | None, device: torch.device | str) -> torch.Generator | None:
    """Samplers draw their noise on the device; derive a device generator from the CPU one."""
    if generator is None:
        return None
    device = torch.device(device)
    if generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device).manual_seed(seed)
