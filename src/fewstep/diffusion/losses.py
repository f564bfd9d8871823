"""The denoising training objective (DDPM's simplified loss, Ho et al. 2020, Eq. 14)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.diffusion.schedules import Schedule


def training_target(prediction: str, x0: Tensor, noise: Tensor, abar: Tensor) -> Tensor:
    """What the network regresses: eps, x0, or v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)."""
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "v":
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0
    raise ValueError(f"unknown prediction {prediction!r}; choose one of: eps, x0, v")


def diffusion_loss(
    net: nn.Module,
    schedule: Schedule,
    x0: Tensor,
    prediction: str = "eps",
    generator: torch.Generator | None = None,
    **cond,
) -> Tensor:
    """MSE between the network output at a uniformly drawn t and the target of ``prediction``."""
    t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    xt = schedule.q_sample(x0, t, noise)
    abar = schedule.gather(schedule.alphas_cumprod, t, x0)
    out = net(xt, t.to(x0.dtype), **cond)
    return F.mse_loss(out.float(), training_target(prediction, x0, noise, abar).float())
