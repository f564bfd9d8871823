"""The denoiser wrapper: every parameterisation gives the exact posterior mean for Gaussian data.

For x0 ~ N(0, s^2 I) and x = x0 + sigma n, E[x0 | x] = s^2 / (s^2 + sigma^2) x. Oracle networks that
return the exact eps / x0 / v / EDM-F for the input they see must all turn into that denoiser.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewstep.diffusion import Denoiser, LinearSchedule, Parameterisation, training_target

DATA_STD = 0.8


class OracleNet(nn.Module):
    """Exact prediction for N(0, DATA_STD^2) data, from the VP input x_t at (fractional) timestep t."""

    def __init__(self, schedule, prediction):
        super().__init__()
        self.schedule, self.prediction = schedule, prediction

    def forward(self, xt, t):
        sigma = self.schedule.t_to_sigma(t).to(xt.dtype).reshape(-1, *[1] * (xt.ndim - 1))
        if self.prediction == "edm":  # input x / sqrt(sigma^2 + sigma_data^2): F* from the posterior means
            edm = Parameterisation(self.schedule, "edm", sigma_data=0.5)
            x = xt * (sigma**2 + 0.5**2).sqrt()
            x0 = DATA_STD**2 / (DATA_STD**2 + sigma**2) * x
            return edm.target(x0, (x - x0) / sigma, sigma)
        abar = 1 / (1 + sigma**2)
        # x_t = sqrt(abar) x0 + sqrt(1 - abar) eps; posterior means of x0 and eps given x_t:
        var = abar * DATA_STD**2 + (1 - abar)
        x0 = abar.sqrt() * DATA_STD**2 / var * xt
        eps = (1 - abar).sqrt() / var * xt
        return training_target(self.prediction, x0, eps, abar)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "edm"])
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
    with pytest.raises(ValueError, match="choose one of: eps, x0, v, edm"):
        Denoiser(nn.Identity(), schedule, "score")


def test_v_target_recovers_x0_and_eps():
    abar = torch.tensor(0.37, dtype=torch.float64)
    x0, eps = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    v = training_target("v", x0, eps, abar)
    assert torch.allclose(abar.sqrt() * xt - (1 - abar).sqrt() * v, x0)
    assert torch.allclose((1 - abar).sqrt() * xt + abar.sqrt() * v, eps)


def test_edm_preconditioning_matches_karras_table_1():
    """EDM (Karras et al. 2022) Table 1 and Eq. 8: unit-variance input, lambda(sigma) = 1 / c_out^2."""
    sigma_data = 0.5
    edm = Parameterisation(LinearSchedule(), "edm", sigma_data=sigma_data)
    sigma = torch.tensor([0.01, 0.3, 2.0, 80.0], dtype=torch.float64).reshape(-1, 1)
    g = torch.Generator().manual_seed(0)
    x0 = sigma_data * torch.randn(4, 200_000, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 200_000, generator=g, dtype=torch.float64)
    x = x0 + sigma * noise
    c_in, c_skip, c_out = edm.preconditioning(sigma)
    assert torch.allclose((c_in * x).std(1), torch.ones(4, dtype=torch.float64), rtol=0.01)  # "unit variance"
    assert torch.allclose(edm.target(x0, noise, sigma).std(1), torch.ones(4, dtype=torch.float64), rtol=0.01)
    # the target is what turns back into x0, and an error e in F is an error c_out e in x0: F's plain MSE
    # is the x0-MSE weighted by lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
    target = edm.target(x0, noise, sigma)
    assert torch.allclose(edm.x0_from_output(target, x, sigma.flatten()), x0)
    error = 0.1 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x0_error = edm.x0_from_output(target + error, x, sigma.flatten()) - x0
    lam = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    assert torch.allclose(error.pow(2).mean(1), (lam * x0_error.pow(2)).mean(1))
    assert torch.allclose(c_skip, sigma_data**2 / (sigma**2 + sigma_data**2))


def test_log_normal_noise_levels():
    """EDM's training noise levels: ln sigma ~ N(P_mean, P_std^2), at the fractional timestep of each sigma."""
    schedule = LinearSchedule()
    levels = Parameterisation(schedule, "edm", noise_levels="log_normal", log_normal_mean=-1.2, log_normal_std=1.2)
    t, sigma = levels.training_noise_levels(50_000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert abs(sigma.log().mean().item() + 1.2) < 0.03 and abs(sigma.log().std().item() - 1.2) < 0.03
    assert torch.allclose(schedule.t_to_sigma(t), sigma, rtol=1e-9)
    assert t.min() >= 0 and t.max() <= schedule.num_timesteps - 1
    assert (t != t.round()).float().mean() > 0.99  # between the discrete timesteps, not rounded to them
    # beyond the schedule's range: clamped to its ends, where the network has a timestep
    high = Parameterisation(schedule, "edm", noise_levels="log_normal", log_normal_mean=20.0, log_normal_std=1.0)
    t, sigma = high.training_noise_levels(10, torch.device("cpu"))
    assert torch.allclose(sigma, torch.full_like(sigma, schedule.sigma_max)) and bool((t == 999).all())
    with pytest.raises(ValueError, match="choose one of: uniform, log_normal"):
        Parameterisation(schedule, "edm", noise_levels="lognormal")
    with pytest.raises(ValueError, match="sigma_data must be > 0"):
        Parameterisation(schedule, "edm", sigma_data=0)
