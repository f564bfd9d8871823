"""Classifier-free guidance as a denoiser that wraps a denoiser, so every sampler guides unchanged.

Ho & Salimans 2022 (Eq. 6), in the x0 form of the contract: with the conditional and unconditional
estimates D_c and D_u of one network (trained with the condition dropped to a null token),

    D_w(x, sigma) = D_u + w (D_c - D_u),

w = 1 is the conditional model, w = 0 the unconditional one, w > 1 trades diversity for adherence.
Kynkaanniemi et al. 2024 ("Applying guidance in a limited interval improves sample and
distribution quality") guide only for sigma in (sigma_min, sigma_max]: at high noise guidance
mostly collapses diversity, at low noise it does little; outside the interval D_c is used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn


class ClassifierFreeGuidance(nn.Module):
    """``ClassifierFreeGuidance(denoiser, scale, uncond)(x, sigma, **cond)``: the guided x0 estimate.

    Args:
        denoiser: the conditional denoiser ``denoiser(x, sigma, **cond)``.
        scale: the guidance weight w.
        uncond: the null condition (e.g. ``{"y": null labels}`` or the empty prompt's embedding);
            tensors with a leading dimension of 1 are broadcast to the batch.
        sigma_min, sigma_max: the guidance interval (``None``: unbounded on that side).

    The conditional and unconditional halves run as one batched call of ``denoiser`` (one forward
    of twice the batch, which counts as two network evaluations per sample).
    """

    def __init__(
        self,
        denoiser: Callable[..., Tensor],
        scale: float,
        uncond: Mapping[str, Any],
        sigma_min: float | None = None,
        sigma_max: float | None = None,
    ) -> None:
        super().__init__()
        if scale < 0:
            raise ValueError(f"guidance.scale must be >= 0, got {scale}")
        if sigma_min is not None and sigma_max is not None and sigma_min >= sigma_max:
            raise ValueError(f"need guidance.sigma_min < guidance.sigma_max, got {sigma_min} and {sigma_max}")
        self.denoiser, self.scale, self.uncond = denoiser, float(scale), dict(uncond)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def in_interval(self, sigma: Tensor) -> Tensor:
        inside = torch.ones_like(sigma, dtype=torch.bool)
        if self.sigma_min is not None:
            inside &= sigma > self.sigma_min
        if self.sigma_max is not None:
            inside &= sigma <= self.sigma_max
        return inside

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        if self.scale == 1:  # exactly the conditional model, one evaluation
            return self.denoiser(x, sigma, **cond)
        uncond = {k: _batched(v, len(x)) for k, v in self.uncond.items()}
        if self.scale == 0:
            return self.denoiser(x, sigma, **{**cond, **uncond})
        inside = self.in_interval(sigma)
        if not bool(inside.any()):
            return self.denoiser(x, sigma, **cond)
        if not bool(inside.all()):  # a batch straddling the interval: guide the rows inside it only
            out = self.denoiser(x, sigma, **cond)
            rows = inside.nonzero().flatten()
            sub = {k: v[rows] if _is_batched(v, len(x)) else v for k, v in cond.items()}
            out[rows] = self(x[rows], sigma[rows], **sub)
            return out
        both = {k: torch.cat([_batched(cond[k], len(x)), uncond[k]]) for k in uncond}
        rest = {k: torch.cat([v, v]) if _is_batched(v, len(x)) else v for k, v in cond.items() if k not in uncond}
        d_cond, d_uncond = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both, **rest).chunk(2)
        return d_uncond + self.scale * (d_cond - d_uncond)


def _is_batched(value: Any, batch: int) -> bool:
    return torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch


def _batched(value: Any, batch: int) -> Tensor:
    """A condition tensor with the batch as its leading dimension (size-1 leading dims broadcast)."""
    if not torch.is_tensor(value):
        raise TypeError(f"classifier-free guidance needs tensor conditions, got {type(value).__name__}")
    if value.ndim > 0 and value.shape[0] == batch:
        return value
    if value.ndim > 0 and value.shape[0] == 1:
        return value.expand(batch, *value.shape[1:])
    if value.ndim == 0:
        return value.expand(batch)
    raise ValueError(f"a condition of leading size {value.shape[0]} does not fit a batch of {batch}")
