"""Dynamic thresholding of the denoiser's x0 estimate (Imagen, Saharia et al. 2022, Sec. 2.3).

At each step, ``s`` = the ``percentile`` of ``|x0_hat|`` per sample, floored at ``max_value``; if
``s > max_value`` the estimate is clipped to ``[-s, s]`` and divided by ``s / max_value``. It keeps
pixel values saturating less than static clipping (``Denoiser(clip_x0=1)``) under strong guidance.
A wrapper around any denoiser, so every sampler gets it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def dynamic_threshold(x0: Tensor, percentile: float = 0.995, max_value: float = 1.0) -> Tensor:
    if not 0 < percentile <= 1 or max_value <= 0:
        raise ValueError(f"need 0 < percentile <= 1 and max_value > 0, got {percentile} and {max_value}")
    s = torch.quantile(x0.abs().flatten(1).float(), percentile, dim=1).to(x0.dtype).clamp(min=max_value)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return x0.clamp(-s, s) * (max_value / s)


class DynamicThreshold(nn.Module):
    """``DynamicThreshold(denoiser, percentile, max_value)(x, sigma, **cond)``: the thresholded x0."""

    def __init__(self, denoiser: Callable[..., Tensor], percentile: float = 0.995, max_value: float = 1.0) -> None:
        super().__init__()
        dynamic_threshold(torch.zeros(1, 1), percentile, max_value)  # validate now
        self.denoiser, self.percentile, self.max_value = denoiser, percentile, max_value

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        return dynamic_threshold(self.denoiser(x, sigma, **cond), self.percentile, self.max_value)
