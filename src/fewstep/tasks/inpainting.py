"""Inpainting on the contract: fill the masked pixels of an image with any denoiser and any sampler.

A mask holds 1 where pixels are to be filled and 0 where the input is kept (diffusers' convention).
The methods change only what the sampler's denoiser sees or returns, so every fewstep sampler runs
them unchanged:

- ``replace`` (Song et al. 2021, App. I.2, "replacement"): the denoiser sees the known pixels as
  the input noised to the current level, ``y + sigma z``, and the unknown ones as the sampler has them;
- ``repaint`` (Lugmayr et al. 2022): ``replace`` plus resampling, each run of ``jump_length`` steps is
  done ``resample`` times, going back up by forward diffusion in between (defaults 10 and 10, their
  paper's setting; they use DDPM with 250 steps);
- ``ddnm`` (Wang et al. 2023, Eq. 13 with ``A = A^+ = `` the keep mask): the denoiser's x0 estimate
  keeps its null-space part (the unknown pixels) and takes the range-space part (the known pixels)
  from the input. Made for few steps: it needs no noise for the known region, so deterministic
  samplers stay deterministic; ``jump_length`` / ``resample`` add its time travel (their Sec. 3.4).

The result's known pixels are exactly the input's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from fewstep.samplers.registry import noise_like
from fewstep.tasks.editing import Generator, Sampler, check_grid, resolve_sampler

METHODS = ("replace", "repaint", "ddnm")
KNOWN_NOISE = ("fresh", "fixed")
REPAINT_DEFAULTS = {"jump_length": 10, "resample": 10}


def check_mask(mask: Tensor, image: Tensor) -> Tensor:
    """The mask as a 0/1 tensor of the image's shape; one-line errors for a mask that cannot be used.

    Accepted shapes: ``[H, W]``, ``[1 or C, H, W]`` or ``[1 or B, 1 or C, H, W]`` (broadcast).
    """
    if not torch.is_tensor(mask):
        raise ValueError(f"mask must be a tensor of 0 (keep) and 1 (fill), got {type(mask).__name__}")
    if mask.shape[-2:] != image.shape[-2:]:
        size, want = "x".join(map(str, mask.shape[-2:])), "x".join(map(str, image.shape[-2:]))
        raise ValueError(f"the mask is {size} but the image is {want}: give a mask of the image's size")
    while mask.ndim < image.ndim:
        mask = mask.unsqueeze(0)
    try:
        torch.broadcast_shapes(mask.shape, image.shape)
    except RuntimeError:
        raise ValueError(
            f"a mask of shape {tuple(mask.shape)} does not fit images of shape {tuple(image.shape)}"
        ) from None
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("the mask must hold only 0 (keep) and 1 (fill): threshold it, e.g. (mask > 0.5).float()")
    mask = mask.to(image).expand_as(image)
    filled = mask.flatten(1).sum(1)
    for i, count in enumerate(filled.tolist()):
        if count == 0:
            raise ValueError(f"the mask of image {i} marks no pixel to fill (1 = fill): there is nothing to inpaint")
        if count == mask[i].numel():
            raise ValueError(f"the mask of image {i} marks every pixel to fill: nothing is known, so sample instead")
    return mask


class KnownReplaced:
    """The denoiser seeing the known pixels as the input noised to the current level (replacement).

    ``fixed_noise``: one noise per image for the whole run (the known pixels then follow the
    forward process of a single draw), else fresh noise at every call, as score-SDE and RePaint do.
    """

    def __init__(
        self,
        denoiser: Callable[..., Tensor],
        image: Tensor,
        keep: Tensor,
        generator: Generator = None,
        fixed_noise: Tensor | None = None,
    ) -> None:
        self.denoiser, self.image, self.keep, self.generator, self.fixed = denoiser, image, keep, generator, fixed_noise

    def __call__(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        noise = self.fixed if self.fixed is not None else noise_like(self.image, self.generator)
        known = self.image + sigma.to(x).view(-1, *[1] * (x.ndim - 1)) * noise
        seen = torch.where(self.keep, known, x)
        # The sampler's own known pixels are never used (the result takes the input's), but samplers
        # that size steps by norms (pc's Langevin, ode_rk45's error control) see them: give them the
        # noise estimate of the replaced pixels, x - D = seen - D(seen), not a stale difference.
        return self.denoiser(seen, sigma, **cond) + (x - seen)


class KnownProjected:
    """The denoiser with its x0 estimate projected onto the known pixels (DDNM, Wang et al. 2023,
    Eq. 13: ``x0 <- A^+ y + (I - A^+ A) x0``, here ``A = A^+ = `` the keep mask)."""

    def __init__(self, denoiser: Callable[..., Tensor], image: Tensor, keep: Tensor) -> None:
        self.denoiser, self.image, self.keep = denoiser, image, keep

    def __call__(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        return torch.where(self.keep, self.image, self.denoiser(x, sigma, **cond))


def resampled(
    run: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sigmas: Tensor,
    jump_length: int,
    resample: int,
    generator: Generator = None,
) -> Tensor:
    """``run(x, grid)`` over ``sigmas`` in segments of ``jump_length`` steps, each done ``resample``
    times: between the passes the segment's end ``x_b`` goes back to its start level by the forward
    process, ``x_a = x_b + sqrt(sigma_a^2 - sigma_b^2) z`` (q(x_a | x_b) in the VE form). This is
    RePaint's resampling schedule (Lugmayr et al. 2022, Algorithm 1 and Sec. 4.2) and DDNM's time
    travel, for any sampler: a multistep solver restarts its history in each pass."""
    steps = len(sigmas) - 1
    for a in range(0, steps, jump_length):
        segment = sigmas[a : min(a + jump_length, steps) + 1]
        for r in range(resample):
            if r > 0:
                up = math.sqrt(float(segment[0]) ** 2 - float(segment[-1]) ** 2)
                x = x + up * noise_like(x, generator)
            x = run(x, segment)
    return x


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


@torch.no_grad()
def inpaint(
    denoiser: Callable[..., Tensor],
    image: Tensor,
    mask: Tensor,
    sigmas: Tensor,
    *,
    method: str = "ddnm",
    sampler: Sampler = "dpmpp_2m",
    generator: Generator = None,
    cond: Mapping | None = None,
    jump_length: int | None = None,
    resample: int | None = None,
    known_noise: str = "fixed",
    **options,
) -> Tensor:
    """Fill the pixels where ``mask`` is 1 (module docstring for the methods).

    ``sigmas`` is the sampling grid, ``sampler`` a name or a sampler function, ``options`` its
    options; ``cond`` the condition the denoiser takes. ``jump_length`` / ``resample`` switch on
    resampling for any method (``repaint`` defaults them to 10 / 10); the network evaluations are
    about ``resample`` times the sampler's. ``known_noise`` ("fresh" | "fixed") is the noise of the
    known pixels for ``replace`` / ``repaint``. Returns images whose known pixels are the input's.
    """
    if method not in METHODS:
        raise ValueError(f"unknown inpainting method {method!r}; choose one of: {', '.join(METHODS)}")
    if known_noise not in KNOWN_NOISE:
        raise ValueError(f"known_noise must be one of {', '.join(KNOWN_NOISE)}, got {known_noise!r}")
    sigmas = check_grid(sigmas)
    steps = len(sigmas) - 1
    keep = check_mask(mask, image) == 0
    if method == "repaint":
        jump_length = REPAINT_DEFAULTS["jump_length"] if jump_length is None else jump_length
        resample = REPAINT_DEFAULTS["resample"] if resample is None else resample
    resample = _positive_int("resample", 1 if resample is None else resample)
    jump_length = _positive_int("jump_length", steps if jump_length is None else jump_length)
    if method == "ddnm":
        wrapped: Callable[..., Tensor] = KnownProjected(denoiser, image, keep)
    else:
        fixed = noise_like(image, generator) if known_noise == "fixed" else None
        wrapped = KnownReplaced(denoiser, image, keep, generator, fixed)
    fn, cond = resolve_sampler(sampler), dict(cond or {})
    x = noise_like(image, generator) * sigmas[0].to(image)

    def run(x: Tensor, grid: Tensor) -> Tensor:
        return fn(wrapped, x, grid, generator=generator, cond=cond, **options)

    x = resampled(run, x, sigmas, jump_length, resample, generator)
    return torch.where(keep, image, x)
