"""Noise schedules against their closed forms; q(x_t | x_0); the DDPM posterior; sampling grids."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.diffusion.schedules import CosineSchedule, LinearSchedule, make_schedule


def test_linear_betas_and_alpha_bar_closed_form():
    s = LinearSchedule(1e-4, 0.02, 1000)
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    t = 437
    expected = math.prod(1 - (1e-4 + (0.02 - 1e-4) * k / 999) for k in range(t + 1))
    assert s.alphas_cumprod[t].item() == pytest.approx(expected, rel=1e-10)
    assert torch.allclose(s.train_sigmas**2, (1 - s.alphas_cumprod) / s.alphas_cumprod)


def test_seed_beta_end_override():
    s = make_schedule("linear", beta_start=1e-4, beta_end=0.01, num_timesteps=1000)
    assert s.betas[-1].item() == pytest.approx(0.01)
    assert s.sigma_max < LinearSchedule().sigma_max


def test_cosine_alpha_bar_closed_form():
    T, s_ = 1000, 0.008
    sched = CosineSchedule(T, s_)

    def f(t):
        return math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2

    for t in (0, 10, 500, 900):  # index t is the paper's t + 1; unclipped region
        assert sched.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert sched.betas.max().item() <= 0.999


def test_q_sample_statistics():
    s = LinearSchedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1), 0.7, dtype=torch.float64)
    t = torch.full((len(x0),), 300)
    xt = s.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    abar = s.alphas_cumprod[300].item()
    assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=4 * math.sqrt((1 - abar) / len(x0)))
    assert xt.var().item() == pytest.approx(1 - abar, rel=0.01)


def test_markov_chain_matches_closed_form():
    """Running x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps step by step gives q(x_t | x_0)."""
    s = LinearSchedule(1e-4, 0.02, 200)
    g = torch.Generator().manual_seed(1)
    x = torch.full((100_000,), -0.5, dtype=torch.float64)
    for beta in s.betas:
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
    abar = s.alphas_cumprod[-1].item()
    assert x.mean().item() == pytest.approx(math.sqrt(abar) * -0.5, abs=0.01)
    assert x.var().item() == pytest.approx(1 - abar, rel=0.02)


def test_posterior_is_bayes_rule():
    """q(x_{t-1} | x_t, x_0) from Gaussian conditioning of the joint, computed directly."""
    s = LinearSchedule()
    t, x0, xt = 500, torch.tensor([0.3], dtype=torch.float64), torch.tensor([-1.2], dtype=torch.float64)
    abar_prev, beta = s.alphas_cumprod[t - 1].item(), s.betas[t].item()
    # x_{t-1} ~ N(sqrt(abar_prev) x0, 1 - abar_prev); x_t | x_{t-1} ~ N(sqrt(1 - beta) x_{t-1}, beta)
    prior_var, lik_var = 1 - abar_prev, beta
    precision = 1 / prior_var + (1 - beta) / lik_var
    mean = (math.sqrt(abar_prev) * x0.item() / prior_var + math.sqrt(1 - beta) * xt.item() / lik_var) / precision
    got_mean, got_var = s.posterior(x0, xt, torch.tensor([t]))
    assert got_mean.item() == pytest.approx(mean, rel=1e-9)
    assert got_var.item() == pytest.approx(1 / precision, rel=1e-9)


@pytest.mark.parametrize("spacing", ["trailing", "quadratic", "karras", "logsnr"])
def test_sigmas_grid(spacing):
    s = LinearSchedule()
    sigmas = s.sigmas(10, spacing)
    assert sigmas.shape == (11,) and sigmas[-1] == 0
    assert bool((sigmas[:-1] > sigmas[1:]).all())
    assert sigmas[0].item() == pytest.approx(s.sigma_max, rel=1e-5)


def test_trailing_spacing_timesteps():
    s = LinearSchedule()
    sigmas = s.sigmas(10, "trailing", dtype=torch.float64)[:-1]
    t = s.sigma_to_t(sigmas).round().long().tolist()
    assert t == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert torch.allclose(s.sigmas(1000, "trailing", dtype=torch.float64)[:-1], s.train_sigmas.flip(0))


def test_sigma_t_round_trip():
    s = CosineSchedule()
    t = torch.tensor([0.0, 3.25, 500.5, 998.9])
    assert torch.allclose(s.sigma_to_t(s.t_to_sigma(t)), t.double(), atol=1e-8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"steps": 1001}, "more than the schedule's 1000"),
        ({"steps": 10, "spacing": "leading"}, "unknown sampler.spacing"),
    ],
)
def test_bad_grids(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LinearSchedule().sigmas(**kwargs)


def test_bad_schedules():
    with pytest.raises(ValueError, match="beta_start <= schedule.beta_end"):
        LinearSchedule(0.02, 1e-4)
    with pytest.raises(ValueError, match="choose one of: linear, cosine"):
        make_schedule("sigmoid")
