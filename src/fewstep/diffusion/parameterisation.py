"""The parameterisation: one object that owns the prediction type, the training loss and the denoiser.

A network is trained in the usual variance-preserving (VP) way, ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``
at a discrete timestep t, and sampled in the variance-exploding (VE) form of EDM (Karras et al. 2022,
Sec. 2), ``x = x0 + sigma n`` with ``abar = 1 / (1 + sigma^2)``. Written as EDM's preconditioning
(Table 1), the denoiser of a network F is

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, t(sigma)),   c_in = 1 / sqrt(1 + sigma^2),

    eps prediction:  c_skip = 1,         c_out = -sigma
    x0 prediction:   c_skip = 0,         c_out = 1
    v prediction:    c_skip = c_in^2,    c_out = -sigma c_in      (v = sqrt(abar) eps - sqrt(1 - abar) x0,
                                                                 Salimans & Ho 2022, Sec. 4)
    edm:             c_skip = sd^2 / (sigma^2 + sd^2),   c_out = sigma sd / sqrt(sigma^2 + sd^2),
                     and c_in = 1 / sqrt(sigma^2 + sd^2)         (EDM Table 1 / Eq. 7, sd = sigma_data)

and the training loss is the MSE of F's output to its target, ``(x0 - c_skip x) / c_out``. The noise
level is drawn as DDPM does, a uniform timestep (the simplified loss, Ho et al. 2020, Eq. 14), or as
EDM does, ``ln sigma ~ N(P_mean, P_std^2)`` (Table 1, "noise distribution"). With ``edm`` the plain
MSE of F is EDM's loss weighting: ``lambda(sigma) = 1 / c_out^2`` (Eq. 8). The MSE can be weighted by
min-SNR-gamma (Hang et al. 2023, Eq. 8): with SNR = abar / (1 - abar) = 1 / sigma^2, the x0-MSE weight
``min(SNR, gamma)`` becomes ``min(SNR, gamma) c_out^2`` on F's MSE (``min(SNR, gamma) / SNR`` for eps,
``min(SNR, gamma) / (SNR + 1)`` for v), since an error e in F is an error ``c_out e`` in x0.

Everything that converts between the network and the samplers' ``denoiser(x, sigma, **cond)``
lives here, so training, sampling and distillation share one implementation.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.diffusion.schedules import Schedule

PREDICTIONS = ("eps", "x0", "v", "edm")
LOSS_WEIGHTINGS = ("uniform", "min_snr")
NOISE_LEVELS = ("uniform", "log_normal")


def training_target(prediction: str, x0: Tensor, noise: Tensor, abar: Tensor) -> Tensor:
    """What the network regresses: eps, x0, or v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022).

    ``edm``'s target depends on sigma_data as well: see :meth:`Parameterisation.target`."""
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "v":
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0
    raise ValueError(f"unknown prediction {prediction!r}; choose one of: {', '.join(PREDICTIONS)}")


class Parameterisation:
    """Prediction type + schedule: the VE <-> VP mapping, the loss, and the network's x0 estimate.

    Args:
        schedule: the discrete training schedule (its sigma <-> t table).
        prediction: what the network predicts: ``eps``, ``x0``, ``v``, or ``edm`` (EDM's preconditioned F).
        loss_weighting: ``uniform`` (the plain MSE of the target) or ``min_snr`` (Hang et al. 2023).
        min_snr_gamma: the gamma of min-SNR weighting (the paper's default 5).
        noise_levels: how training draws the noise level: ``uniform`` timesteps (DDPM) or ``log_normal``
            (EDM: ``ln sigma ~ N(log_normal_mean, log_normal_std^2)``, clamped to the schedule's range).
        log_normal_mean, log_normal_std: EDM's P_mean and P_std (-1.2 and 1.2 in the paper).
        sigma_data: the data's standard deviation in ``edm``'s preconditioning (EDM's 0.5).
    """

    def __init__(
        self,
        schedule: Schedule,
        prediction: str = "eps",
        loss_weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        noise_levels: str = "uniform",
        log_normal_mean: float = -1.2,
        log_normal_std: float = 1.2,
        sigma_data: float = 0.5,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of: {', '.join(PREDICTIONS)}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss_weighting {loss_weighting!r}; choose one of: {', '.join(LOSS_WEIGHTINGS)}")
        if noise_levels not in NOISE_LEVELS:
            raise ValueError(f"unknown noise_levels {noise_levels!r}; choose one of: {', '.join(NOISE_LEVELS)}")
        positive = {"min_snr_gamma": min_snr_gamma, "log_normal_std": log_normal_std, "sigma_data": sigma_data}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.schedule, self.prediction = schedule, prediction
        self.loss_weighting, self.min_snr_gamma = loss_weighting, min_snr_gamma
        self.noise_levels, self.log_normal_mean, self.log_normal_std = noise_levels, log_normal_mean, log_normal_std
        self.sigma_data = sigma_data

    # ------------------------------------------------------------------------------- sampling
    def preconditioning(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """EDM Table 1's ``(c_in, c_skip, c_out)`` at ``sigma`` for this prediction type."""
        if self.prediction == "edm":
            scale = (sigma**2 + self.sigma_data**2).rsqrt()
            return scale, self.sigma_data**2 * scale**2, sigma * self.sigma_data * scale
        c_in = (1 + sigma**2).rsqrt()  # the VP input sqrt(abar) x
        if self.prediction == "eps":
            return c_in, torch.ones_like(sigma), -sigma
        if self.prediction == "x0":
            return c_in, torch.zeros_like(sigma), torch.ones_like(sigma)
        return c_in, c_in**2, -sigma * c_in

    def network_input(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """The input ``c_in x`` and the fractional timestep the network was trained on at ``sigma`` ([B])."""
        c_in, _, _ = self.preconditioning(_per_sample(sigma, x))
        return x * c_in, self.schedule.sigma_to_t(sigma).to(x.dtype)

    def x0_from_output(self, out: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        """EDM Table 1: ``c_skip x + c_out F`` for this prediction type (``x`` in VE form)."""
        s = _per_sample(sigma, x)
        if self.prediction == "eps":  # written out: the common case, and x - sigma eps is exact in floats
            return x - s * out
        if self.prediction == "x0":
            return out
        _, c_skip, c_out = self.preconditioning(s)
        return c_skip * x + c_out * out

    def denoise(self, net: nn.Module, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        """``D(x, sigma) = E[x0 | x]`` estimated by ``net``: the contract's denoiser."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
        if sigma.numel() == 1 and x.shape[0] != 1:
            sigma = sigma.expand(x.shape[0])
        xt, t = self.network_input(x, sigma)
        return self.x0_from_output(net(xt, t, **cond), x, sigma)

    # ------------------------------------------------------------------------------- training
    def target(self, x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
        """F's regression target ``(x0 - c_skip x) / c_out`` at ``x = x0 + sigma noise`` (``sigma`` broadcast)."""
        if self.prediction != "edm":
            return training_target(self.prediction, x0, noise, 1 / (1 + sigma**2))
        _, c_skip, c_out = self.preconditioning(sigma)
        return (x0 - c_skip * (x0 + sigma * noise)) / c_out

    def loss_weight(self, abar: Tensor) -> Tensor:
        """Per-sample weight of F's MSE: 1, or min-SNR-gamma's ``min(SNR, gamma) c_out^2`` (see module doc)."""
        if self.loss_weighting == "uniform":
            return torch.ones_like(abar)
        snr = abar / (1 - abar)
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.prediction == "edm":
            return clipped * self.preconditioning(snr.rsqrt())[2] ** 2
        return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[self.prediction]

    def training_noise_levels(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(t, sigma)`` for a training batch: uniform timesteps, or EDM's log-normal sigma at fractional t."""
        if self.noise_levels == "uniform":
            t = torch.randint(0, self.schedule.num_timesteps, (batch,), device=device, generator=generator)
            return t, self.schedule.gather(self.schedule.train_sigmas, t, t.double())  # its cached device copy
        z = torch.randn(batch, device=device, dtype=torch.float64, generator=generator)
        sigma = (self.log_normal_mean + self.log_normal_std * z).exp()
        sigma = sigma.clamp(self.schedule.sigma_min, self.schedule.sigma_max)  # where the network has a timestep
        return self.schedule.sigma_to_t(sigma), sigma

    def loss(
        self,
        net: nn.Module,
        x0: Tensor,
        cond: Mapping[str, object] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Weighted MSE between ``net(c_in x, t, **cond)`` and its target at drawn noise levels."""
        t, sigma = self.training_noise_levels(x0.shape[0], x0.device, generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        s = _per_sample(sigma, x0)
        # c_in x: for eps / x0 / v the VP x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, whatever the levels
        out = net(self.preconditioning(s)[0] * (x0 + s * noise), t.to(x0.dtype), **dict(cond or {}))
        target = self.target(x0, noise, s)
        if self.loss_weighting == "uniform":
            return F.mse_loss(out.float(), target.float())
        per_sample = (out.float() - target.float()).pow(2).flatten(1).mean(1)
        return (self.loss_weight(1 / (1 + sigma**2)).float() * per_sample).mean()

    def __repr__(self) -> str:
        return (
            f"Parameterisation({self.schedule!r}, prediction={self.prediction!r}, loss={self.loss_weighting!r}, "
            f"noise_levels={self.noise_levels!r})"
        )


class Denoiser(nn.Module):
    """``Denoiser(net, schedule, prediction)(x, sigma, **cond) -> x0_hat``: a network as the samplers see it.

    ``schedule`` may also be a :class:`Parameterisation` (then ``prediction`` is taken from it).
    ``clip_x0`` clamps the estimate to ``[-clip_x0, clip_x0]`` (pixel models whose data lie in [-1, 1]).
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: Schedule | Parameterisation,
        prediction: str = "eps",
        clip_x0: float | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.parameterisation = (
            schedule if isinstance(schedule, Parameterisation) else Parameterisation(schedule, prediction)
        )
        self.clip_x0 = clip_x0

    @property
    def schedule(self) -> Schedule:
        return self.parameterisation.schedule

    @property
    def prediction(self) -> str:
        return self.parameterisation.prediction

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        x0 = self.parameterisation.denoise(self.net, x, sigma, **cond)
        return x0.clamp(-self.clip_x0, self.clip_x0) if self.clip_x0 is not None else x0


def _per_sample(sigma: Tensor, like: Tensor) -> Tensor:
    return sigma.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
