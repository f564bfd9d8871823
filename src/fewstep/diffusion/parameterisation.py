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

and the training loss is the MSE of F's output to its target at a uniformly drawn timestep (DDPM's
simplified loss, Ho et al. 2020, Eq. 14), optionally weighted by min-SNR-gamma (Hang et al. 2023,
Eq. 8): with SNR = abar / (1 - abar) = 1 / sigma^2, the x0-MSE weight ``min(SNR, gamma)`` becomes
``min(SNR, gamma) / SNR`` on the eps-MSE and ``min(SNR, gamma) / (SNR + 1)`` on the v-MSE.

Everything that converts between the network and the samplers' ``denoiser(x, sigma, **cond)``
lives here, so training, sampling and distillation share one implementation.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.diffusion.schedules import Schedule

PREDICTIONS = ("eps", "x0", "v")
LOSS_WEIGHTINGS = ("uniform", "min_snr")


def training_target(prediction: str, x0: Tensor, noise: Tensor, abar: Tensor) -> Tensor:
    """What the network regresses: eps, x0, or v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)."""
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
        prediction: what the network predicts, ``eps``, ``x0`` or ``v``.
        loss_weighting: ``uniform`` (DDPM's simplified loss) or ``min_snr`` (Hang et al. 2023).
        min_snr_gamma: the gamma of min-SNR weighting (the paper's default 5).
    """

    def __init__(
        self,
        schedule: Schedule,
        prediction: str = "eps",
        loss_weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of: {', '.join(PREDICTIONS)}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss_weighting {loss_weighting!r}; choose one of: {', '.join(LOSS_WEIGHTINGS)}")
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        self.schedule, self.prediction = schedule, prediction
        self.loss_weighting, self.min_snr_gamma = loss_weighting, min_snr_gamma

    # ------------------------------------------------------------------------------- sampling
    def network_input(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """The VP input ``c_in x`` and the fractional timestep the network was trained on at ``sigma`` ([B])."""
        c_in = (1 + _per_sample(sigma, x) ** 2).rsqrt()
        return x * c_in, self.schedule.sigma_to_t(sigma).to(x.dtype)

    def x0_from_output(self, out: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        """EDM Table 1: ``c_skip x + c_out F`` for this prediction type (``x`` in VE form)."""
        s = _per_sample(sigma, x)
        if self.prediction == "eps":
            return x - s * out
        if self.prediction == "x0":
            return out
        c_in = (1 + s**2).rsqrt()
        return c_in**2 * x - s * c_in * out

    def denoise(self, net: nn.Module, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        """``D(x, sigma) = E[x0 | x]`` estimated by ``net``: the contract's denoiser."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
        if sigma.numel() == 1 and x.shape[0] != 1:
            sigma = sigma.expand(x.shape[0])
        xt, t = self.network_input(x, sigma)
        return self.x0_from_output(net(xt, t, **cond), x, sigma)

    # ------------------------------------------------------------------------------- training
    def loss_weight(self, abar: Tensor) -> Tensor:
        """Per-sample weight of the target's MSE (1, or min-SNR-gamma in this prediction's units)."""
        if self.loss_weighting == "uniform":
            return torch.ones_like(abar)
        snr = abar / (1 - abar)
        clipped = snr.clamp(max=self.min_snr_gamma)
        return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[self.prediction]

    def loss(
        self,
        net: nn.Module,
        x0: Tensor,
        cond: Mapping[str, object] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Weighted MSE between ``net(x_t, t, **cond)`` and the target, at uniformly drawn timesteps."""
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        xt = self.schedule.q_sample(x0, t, noise)
        abar = self.schedule.gather(self.schedule.alphas_cumprod, t, x0)
        out = net(xt, t.to(x0.dtype), **dict(cond or {}))
        target = training_target(self.prediction, x0, noise, abar)
        if self.loss_weighting == "uniform":
            return F.mse_loss(out.float(), target.float())
        per_sample = (out.float() - target.float()).pow(2).flatten(1).mean(1)
        return (self.loss_weight(abar.flatten().float()) * per_sample).mean()

    def __repr__(self) -> str:
        return f"Parameterisation({self.schedule!r}, prediction={self.prediction!r}, loss={self.loss_weighting!r})"


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
