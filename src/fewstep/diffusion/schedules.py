"""Noise schedules of discrete-time variance-preserving diffusion (DDPM, Ho et al. 2020).

A schedule holds ``beta_t`` for ``t = 0 .. T-1`` (index 0 is the paper's t = 1) and everything
derived from it in float64:

    alpha_bar_t = prod_{s<=t} (1 - beta_s)                    (DDPM Eq. 4)
    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)
    sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)          (the variance-exploding noise level)

Samplers see only ``sigma``: ``x_t / sqrt(alpha_bar_t) = x_0 + sigma_t * eps`` (EDM, Karras et
al. 2022, Sec. 2), so one set of samplers serves every schedule.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fewstep.samplers.spacing import make_sigmas, sigma_to_t, t_to_sigma


class Schedule:
    """A discrete VP schedule given by its betas."""

    TABLES = ("betas", "alphas", "alphas_cumprod", "train_sigmas")

    def __init__(self, betas: Tensor) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError("a schedule needs at least 2 timesteps")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta must lie in (0, 1); check schedule.beta_start / schedule.beta_end")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.train_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        # log sigma table per device: the denoiser maps sigma -> t on every network call
        self._log_sigmas: dict[torch.device, Tensor] = {}
        self._tables: dict[tuple[str, torch.device], Tensor] = {}  # TABLES on other devices (gather)

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    @property
    def sigma_min(self) -> float:
        return float(self.train_sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.train_sigmas[-1])

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) in closed form (DDPM Eq. 4)."""
        abar = self.gather(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def posterior(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0) (DDPM Eqs. 6-7), for t >= 1.

        mean = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
        var  = beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t
        """
        abar = self.gather(self.alphas_cumprod, t, x0)
        abar_prev = self.gather(self.alphas_cumprod, t - 1, x0)
        beta = self.gather(self.betas, t, x0)
        alpha = 1 - beta
        mean = abar_prev.sqrt() * beta / (1 - abar) * x0 + alpha.sqrt() * (1 - abar_prev) / (1 - abar) * xt
        return mean, (1 - abar_prev) / (1 - abar) * beta

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The fractional training timestep of a noise level (log-sigma interpolation)."""
        if sigma.device not in self._log_sigmas:
            self._log_sigmas[sigma.device] = self.train_sigmas.log().to(sigma.device)
        return sigma_to_t(self.train_sigmas, sigma, self._log_sigmas[sigma.device])

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return t_to_sigma(self.train_sigmas, t)

    def sigmas(self, steps: int, spacing: str = "trailing", dtype: torch.dtype = torch.float32, **options) -> Tensor:
        """The sampling grid: ``steps + 1`` decreasing noise levels ending in 0.

        A ``sigma_max`` above the schedule's largest level is capped there: the model was trained on no
        noisier level (so ``sampler=auto``'s ``sigma_max: 20`` starts at the schedule's own top on a
        schedule that ends below 20)."""
        if options.get("sigma_max") is not None:
            options["sigma_max"] = min(float(options["sigma_max"]), self.sigma_max)
        return make_sigmas(self.train_sigmas, steps, spacing, dtype=dtype, **options)

    def gather(self, table: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """``table[t]`` in ``like``'s dtype, shaped to broadcast against it.

        The schedule's own tables are copied to ``like``'s device once: a copy from host memory at
        every training step would make the CPU wait for the GPU (a host-device sync).
        """
        name = next((n for n in self.TABLES if getattr(self, n) is table), None)
        if name is None:
            on_device = table.to(like.device)
        else:
            on_device = self._tables.get((name, like.device))
            if on_device is None:
                on_device = self._tables[(name, like.device)] = table.to(like.device)
        values = on_device[t.long()].to(like.dtype)
        return values.reshape(-1, *([1] * (like.ndim - 1)))

    def __repr__(self) -> str:
        sigmas = f"[{self.sigma_min:.4g}, {self.sigma_max:.4g}]"
        return f"{type(self).__name__}(num_timesteps={self.num_timesteps}, sigma={sigmas})"


class LinearSchedule(Schedule):
    """Betas linear from ``beta_start`` to ``beta_end`` (DDPM, Sec. 4: 1e-4 to 0.02, T = 1000)."""

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, num_timesteps: int = 1000) -> None:
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < schedule.beta_start <= schedule.beta_end < 1, got {beta_start} and {beta_end}")
        super().__init__(torch.linspace(beta_start, beta_end, _check_timesteps(num_timesteps), dtype=torch.float64))


class CosineSchedule(Schedule):
    """alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) pi/2) (Nichol & Dhariwal 2021, Eq. 17).

    Betas are clipped to ``max_beta`` = 0.999 to avoid the singularity at t = T (their Sec. 3.2).
    """

    def __init__(self, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> None:
        num_timesteps = _check_timesteps(num_timesteps)
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)
        super().__init__(betas)


def _check_timesteps(num_timesteps: int) -> int:
    if not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise ValueError(f"schedule.num_timesteps must be an integer >= 2, got {num_timesteps!r}")
    return num_timesteps


SCHEDULES = {"linear": LinearSchedule, "cosine": CosineSchedule}


def make_schedule(name: str = "linear", **options) -> Schedule:
    """Build a schedule by its config name (``conf/schedule/NAME.yaml``)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")
    try:
        return SCHEDULES[name](**options)
    except TypeError as err:
        raise ValueError(f"bad options for schedule {name!r}: {err}") from None
