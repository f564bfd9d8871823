"""The denoiser wrapper: every parameterisation gives the exact posterior mean for Gaussian data.

For x0 ~ N(0, s^2 I) and x = x0 + sigma n, E[x0 | x] = s^2 / (s^2 + sigma^2) x. Oracle networks that
return the exact eps / x0 / v for the VP input they see must all turn into that denoiser.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewstep.diffusion import Denoiser, LinearSchedule, training_target

DATA_STD = 0.8


class OracleNet(nn.Module):
    """Exact prediction for N(0, DATA_STD^2) data, from the VP input x_t at (fractional) timestep t."""

    def __init__(self, schedule, prediction):
        super().__init__()
        self.schedule, self.prediction = schedule, prediction

    def forward(self, xt, t):
        sigma = self.schedule.t_to_sigma(t).to(xt.dtype).reshape(-1, *[1] * (xt.ndim - 1))
        abar = 1 / (1 + sigma**2)
        # x_t = sqrt(abar) x0 + sqrt(1 - abar) eps; posterior means of x0 and eps given x_t:
        var = abar * DATA_STD**2 + (1 - abar)
        x0 = abar.sqrt() * DATA_STD**2 / var * xt
        eps = (1 - abar).sqrt() / var * xt
        return training_target(self.prediction, x0, eps, abar)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_denoiser_is_exact_posterior_mean(prediction):
    schedule = LinearSchedule()
    denoiser = Denoiser(OracleNet(schedule, prediction), schedule, prediction)
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.02, 0.5, 3.3, 40.0, 150.0], dtype=torch.float64)  # between training levels too
    expected = DATA_STD**2 / (DATA_STD**2 + sigma**2).reshape(-1, 1, 1, 1) * x
    assert torch.allclose(denoiser(x, sigma), expected, rtol=1e-9, atol=1e-12)


def test_clip_and_bad_prediction():
    schedule = LinearSchedule()
    denoiser = Denoiser(OracleNet(schedule, "x0"), schedule, "x0", clip_x0=0.1)
    out = denoiser(torch.full((2, 3), 10.0), torch.tensor([0.5, 0.5]))
    assert out.abs().max().item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="choose one of: eps, x0, v"):
        Denoiser(nn.Identity(), schedule, "score")


def test_v_target_recovers_x0_and_eps():
    abar = torch.tensor(0.37, dtype=torch.float64)
    x0, eps = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    v = training_target("v", x0, eps, abar)
    assert torch.allclose(abar.sqrt() * xt - (1 - abar).sqrt() * v, x0)
    assert torch.allclose((1 - abar).sqrt() * xt + abar.sqrt() * v, eps)
