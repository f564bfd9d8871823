"""The denoiser wrapper: a VP-trained network seen as ``denoiser(x, sigma) -> x0_hat``.

In the variance-exploding form of EDM (Karras et al. 2022, Table 1) a sample is
``x = x0 + sigma * n``. A network trained on DDPM's ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``
sees ``x_t = x / sqrt(1 + sigma^2)`` (since ``abar = 1 / (1 + sigma^2)``) at the timestep whose
training noise level is ``sigma``. The wrapper does that scaling and converts the network's
prediction to the clean image, so samplers never know how the network was parameterised.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fewstep.diffusion.schedules import Schedule

PREDICTIONS = ("eps", "x0", "v")


class Denoiser(nn.Module):
    """``Denoiser(net, schedule, prediction)(x, sigma, **cond) -> x0_hat``.

    ``net(x_t, t, **cond)`` predicts ``eps``, ``x0`` or ``v = sqrt(abar) eps - sqrt(1 - abar) x0``
    (Salimans & Ho 2022, Sec. 4). ``clip_x0`` clamps the estimate to ``[-clip_x0, clip_x0]``
    (pixel models whose data lie in [-1, 1]).
    """

    def __init__(self, net: nn.Module, schedule: Schedule, prediction: str = "eps", clip_x0: float | None = None):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of: {', '.join(PREDICTIONS)}")
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        self.clip_x0 = clip_x0

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
        if sigma.numel() == 1 and x.shape[0] != 1:
            sigma = sigma.expand(x.shape[0])
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        c_in = (1 + s**2).rsqrt()  # = sqrt(abar): VE -> VP input scaling
        t = self.schedule.sigma_to_t(sigma).to(x.dtype)
        out = self.net(x * c_in, t, **cond)
        if self.prediction == "eps":
            x0 = x - s * out
        elif self.prediction == "x0":
            x0 = out
        else:  # v: x0 = sqrt(abar) x_t - sqrt(1 - abar) v, with sqrt(1 - abar) = sigma * c_in
            x0 = c_in * (x * c_in) - s * c_in * out
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
        return x0
