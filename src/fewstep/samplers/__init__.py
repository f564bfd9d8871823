"""Samplers: one short function per method, all with the signature

    x0 = sampler(denoiser, x, sigmas, *, generator=None, callback=None, **options)

``denoiser(x, sigma[batch], **cond) -> x0_hat``; ``sigmas`` decreasing and ending in 0;
``x = noise * sigmas[0]``. See docs/contract.md.
"""

from fewstep.samplers import adaptive, ancestral, consistency, learned, multistep, ode, restart, sde  # noqa: F401 (registering)
from fewstep.samplers.registry import SAMPLERS, SampleGenerators, get_sampler, register
from fewstep.samplers.spacing import SPACINGS, make_sigmas

__all__ = ["SAMPLERS", "SPACINGS", "SampleGenerators", "get_sampler", "make_sigmas", "register"]
