"""Samplers against exact answers: a Gaussian mixture has a closed-form denoiser, so the PF-ODE
solution and the sample distribution are known (tests/gmm.py)."""

from __future__ import annotations

import functools
import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from gmm import GaussianMixture, ode_reference

from fewstep.diffusion.sampling import CountingDenoiser as Counting
from fewstep.diffusion.sampling import SamplerSpec, auto_config, optimized_sigmas
from fewstep.diffusion.schedules import LinearSchedule
from fewstep.diffusion.thresholding import DynamicThreshold, dynamic_threshold
from fewstep.samplers import SAMPLERS, get_sampler, make_sigmas
from fewstep.samplers.learned import (
    fine_trajectory,
    fit_coefficients,
    fitted_sampler,
    multistep_weights,
    refine_coefficients,
    start_errors,
)
from fewstep.samplers.optimize import LD3_SAMPLERS, _solve_differentiably, ld3_sigmas, load_or_optimize, optimize_sigmas
from fewstep.samplers.spacing import karras

CONF = Path(__file__).resolve().parents[1] / "src" / "fewstep" / "conf" / "sampler"
GRID_KEYS = {"name", "steps", "spacing", "rho", "sigma_min", "sigma_max"}  # read by the caller
CONTRACT = {"denoiser", "x", "sigmas", "generator", "callback", "cond"}
SIGMA_MAX, SIGMA_MIN = 20.0, 0.01
TABLE = torch.ones(1000)  # karras() only checks steps against the table length


def karras_grid(steps: int, sigma_max: float = SIGMA_MAX, sigma_min: float = SIGMA_MIN) -> torch.Tensor:
    sigmas = karras(TABLE, steps, sigma_min=sigma_min, sigma_max=sigma_max)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).flatten(1).sum(1).mean().sqrt())


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gmm() -> GaussianMixture:
    return GaussianMixture.random(dim=4, components=3, seed=0, spread=1.0)  # overlapping: a smooth ODE map


@pytest.fixture(scope="module")
def ode_problem(gmm: GaussianMixture) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * SIGMA_MAX
    return x, ode_reference(gmm, x, SIGMA_MAX, SIGMA_MIN)


# (sampler, options, step counts, order of convergence). UniPC's corrector adds one order to the
# predictor's (Zhao et al. 2023, Thm 3.3); iPNDM's fixed (equal-step) weights are order 2 on a Karras grid.
ORDER_CASES = [
    ("euler", {}, [16, 32, 64], 1),
    ("ddim", {}, [16, 32, 64], 1),
    ("heun", {}, [16, 32, 64], 2),
    ("dpmpp_2m", {}, [16, 32, 64], 2),
    ("dpmpp_3m", {}, [32, 64, 128], 3),
    ("dpmpp_2m_sde", {"eta": 0.0}, [16, 32, 64], 2),
    ("unipc", {"order": 1}, [16, 32, 64], 2),
    ("unipc", {"order": 2}, [32, 64, 128], 3),
    ("unipc", {"order": 2, "variant": "bh1"}, [32, 64, 128], 3),
    ("unipc", {"order": 3}, [32, 64, 128], 4),
    ("unipc", {"order": 2, "corrector": False}, [32, 64, 128], 2),
    ("ipndm", {"order": 1}, [16, 32, 64], 1),
    ("ipndm", {"order": 2, "variable_step": True}, [32, 64, 128], 2),
    ("ipndm", {"order": 3, "variable_step": True}, [64, 128, 256], 3),
    # Its Euler/AB2/AB3 warm-up caps the asymptotic order (local error h^2 in step 1), but at
    # sigma_max the path is nearly straight, so that term stays small over practical step counts.
    ("ipndm", {"order": 4, "variable_step": True}, [64, 128, 256], (3.3, 4.35)),
    ("ipndm", {"order": 4}, [32, 64, 128], 2),
    ("deis", {"order": 1}, [16, 32, 64], 1),
    ("deis", {"order": 2}, [32, 64, 128], 2),
    ("deis", {"order": 3}, [64, 128, 256], 3),
    # In log sigma the path is not straight at sigma_max, so the Euler first step's h^2 local error
    # shows: measured slope 2.35 over these counts (the warm-up caveat of ipndm order 4, stronger).
    ("deis", {"order": 4}, [64, 128, 256], (2.2, 4.35)),
    ("learned", {}, [32, 64, 128], 3),  # unfitted: DEIS log-sigma of order 3 without lower-order final steps
    ("learned", {"form": "data"}, [16, 32, 64], 2),  # unfitted: DPM-Solver++(2M)
    ("learned", {"form": "data", "start_from": "unipc"}, [32, 64, 128], 3),  # unfitted: UniPC-2 itself
    ("gradient_estimation", {}, [16, 32, 64], 1),
]


@pytest.mark.parametrize(("name", "options", "steps", "order"), ORDER_CASES, ids=lambda v: str(v))
def test_convergence_order(gmm, ode_problem, name, options, steps, order):
    x, ref = ode_problem
    if "lower_order_final" in inspect.signature(SAMPLERS[name]).parameters:
        options = {**options, "lower_order_final": False}  # a clean asymptotic order
    errors = [rms(SAMPLERS[name](gmm.denoiser, x, karras_grid(n), **options), ref) for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    low, high = order if isinstance(order, tuple) else (order - 0.35, order + 0.35)
    assert low < slope < high, f"{name} {options}: slope {slope:.2f}, errors {errors}"


def test_multistep_final_steps_fall_back_to_lower_order(gmm, ode_problem):
    """lower_order_final only changes grids of < 15 steps, and there only the last steps."""
    x, _ = ode_problem
    for name in ("dpmpp_3m", "unipc", "ipndm"):
        fn = SAMPLERS[name]
        long_a, long_b = (fn(gmm.denoiser, x, karras_grid(20), order=3, lower_order_final=v) for v in (True, False))
        torch.testing.assert_close(long_a, long_b, rtol=0, atol=0)
        short_a, short_b = (fn(gmm.denoiser, x, karras_grid(8), order=3, lower_order_final=v) for v in (True, False))
        assert not torch.equal(short_a, short_b)


def test_ipndm_variable_weights_reduce_to_classic_on_uniform_grid(gmm, ode_problem):
    x, _ = ode_problem
    sigmas = torch.cat([torch.linspace(SIGMA_MAX, 0.5, 12, dtype=torch.float64), torch.zeros(1)])
    a = SAMPLERS["ipndm"](gmm.denoiser, x, sigmas, variable_step=True)
    b = SAMPLERS["ipndm"](gmm.denoiser, x, sigmas, variable_step=False)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_restart_and_gradient_estimation_reduce_to_heun_and_ddim(gmm, ode_problem):
    x, _ = ode_problem
    sigmas = karras_grid(8)
    heun = SAMPLERS["heun"](gmm.denoiser, x, sigmas)
    torch.testing.assert_close(SAMPLERS["restart"](gmm.denoiser, x, sigmas, restart_times=0), heun)
    ddim = SAMPLERS["ddim"](gmm.denoiser, x, sigmas)
    torch.testing.assert_close(SAMPLERS["gradient_estimation"](gmm.denoiser, x, sigmas, gamma=1.0), ddim)
    counting = Counting(gmm.denoiser)
    SAMPLERS["restart"](counting, x, sigmas, restart_times=2, restart_steps=3, generator=torch.Generator())
    assert counting.calls == 2 * 8 - 1 + 2 * 2 * 3  # Heun down the grid plus two 3-step Heun loops


def test_deis_sigma_variable_is_ipndm_variable_step(gmm, ode_problem):
    x, _ = ode_problem
    sigmas = karras_grid(12)
    for order in (2, 3, 4):
        a = SAMPLERS["deis"](gmm.denoiser, x, sigmas, order=order, variable="sigma")
        b = SAMPLERS["ipndm"](gmm.denoiser, x, sigmas, order=order, variable_step=True)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_known_equivalences(gmm, ode_problem):
    """Euler = DDIM(eta=0); UniP-2 with B(h) = e^h - 1 and a_1 = 1/2 = DPM-Solver++(2M); the SDE
    solver at eta = 0 = the Taylor form of 2M (dpmpp_3m with order=2)."""
    x, _ = ode_problem
    grid = karras_grid(10)
    run = {name: lambda name=name, **o: SAMPLERS[name](gmm.denoiser, x, grid, **o) for name in SAMPLERS}
    torch.testing.assert_close(run["euler"](), run["ddim"]())
    torch.testing.assert_close(run["unipc"](order=2, variant="bh2", corrector=False), run["dpmpp_2m"]())
    torch.testing.assert_close(run["dpmpp_2m_sde"](eta=0.0), run["dpmpp_3m"](order=2))


@pytest.mark.parametrize("tol", [1e-4, 1e-7])
def test_ode_rk45_meets_tolerance_and_reports_nfe(gmm, ode_problem, tol):
    x, ref = ode_problem
    stats: dict = {}
    counting = Counting(gmm.denoiser)
    out = SAMPLERS["ode_rk45"](counting, x, karras_grid(2), rtol=tol, atol=tol, stats=stats)
    assert stats["nfe"] == counting.calls > 0
    assert stats["nfe"] == 2 + 6 * (stats["steps"] + stats["rejected"])  # f(x0), start-step probe, 6 per step (FSAL)
    assert rms(out, ref) < 20 * tol * math.sqrt(x.shape[1])


# ----------------------------------------------------------------------------- stochastic samplers

MIXTURE_2D = GaussianMixture(
    torch.tensor([0.5, 0.3, 0.2]),
    torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]]),
    torch.tensor([[0.5, 0.3], [0.4, 0.6], [0.7, 0.4]]),
)
SCHEDULE = LinearSchedule(beta_start=1e-4, beta_end=0.02, num_timesteps=1000)

STOCHASTIC_CASES = [
    ("ddpm", 1000, "trailing", {}, {}),
    ("ddim", 100, "trailing", {}, {"eta": 1.0}),
    ("dpmpp_2m_sde", 50, "karras", {}, {"eta": 1.0}),
    ("euler_maruyama", 500, "logsnr", {}, {}),
    ("pc", 100, "logsnr", {}, {"snr": 0.16, "n_corrector": 1}),
    ("annealed_langevin", 20, "logsnr", {"sigma_max": 10.0}, {"n_steps_each": 50, "step_lr": 5e-5}),
    ("heun", 50, "karras", {}, {"s_churn": 20.0}),
    ("restart", 30, "karras", {}, {"restart_sigma_min": 0.3, "restart_sigma_max": 2.0, "restart_times": 3}),
]


@pytest.mark.parametrize(
    ("name", "steps", "spacing", "grid_options", "options"), STOCHASTIC_CASES, ids=lambda v: str(v)
)
def test_stochastic_sampler_distribution(name, steps, spacing, grid_options, options):
    """Mean, covariance and mixture weights E[p(k | x)] (= w_k exactly under the true law) within
    5 standard errors, estimated from the samples themselves."""
    n, gmm = 4000, MIXTURE_2D
    g = torch.Generator().manual_seed(0)
    sigmas = SCHEDULE.sigmas(steps, spacing, dtype=torch.float64, **grid_options)
    x = SAMPLERS[name](
        gmm.denoiser, torch.randn(n, 2, generator=g, dtype=torch.float64) * sigmas[0], sigmas, generator=g, **options
    )
    centred = x - x.mean(0)
    products = (centred[:, :, None] * centred[:, None, :]).reshape(n, -1)
    resp = gmm.responsibilities(x)
    for label, values, truth in [
        ("mean", x, gmm.mean()),
        ("covariance", products, gmm.cov().reshape(-1)),
        ("weights", resp, gmm.weights),
    ]:
        z = (values.mean(0) - truth) / (values.std(0) / math.sqrt(n))
        assert float(z.abs().max()) < 5, f"{name}: {label} off by {z.tolist()} standard errors"


def test_ddpm_equals_ddim_eta1_and_vp_algorithm():
    schedule = LinearSchedule(beta_start=1e-4, beta_end=0.02, num_timesteps=200)
    gmm = MIXTURE_2D
    sigmas = schedule.sigmas(200, "trailing", dtype=torch.float64)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ddpm = SAMPLERS["ddpm"](gmm.denoiser, noise * sigmas[0], sigmas, generator=torch.Generator().manual_seed(4))
    ddim = SAMPLERS["ddim"](
        gmm.denoiser, noise * sigmas[0], sigmas, generator=torch.Generator().manual_seed(4), eta=1.0
    )
    torch.testing.assert_close(ddpm, ddim, rtol=1e-10, atol=1e-10)

    # DDPM Algorithm 2 in VP coordinates x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, with the model's
    # x0 estimate plugged into the posterior q(x_{t-1} | x_t, x0) (Ho et al. 2020, Eqs. 6-7).
    g, abar = torch.Generator().manual_seed(4), schedule.alphas_cumprod
    x = noise * sigmas[0] * abar[-1].sqrt()
    for t in range(schedule.num_timesteps - 1, 0, -1):
        sigma = ((1 - abar[t]) / abar[t]).sqrt()
        x0 = gmm.denoiser(x / abar[t].sqrt(), sigma.expand(len(x)))
        mean, var = schedule.posterior(x0, x, torch.full((len(x),), t))
        x = mean + var.sqrt() * torch.randn(x.shape, generator=g, dtype=x.dtype)
    x = gmm.denoiser(x / abar[0].sqrt(), ((1 - abar[0]) / abar[0]).sqrt().expand(len(x)))
    torch.testing.assert_close(ddpm, x, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- contract and errors


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_image_shaped_float32_input_and_batch_sigma(name):
    gmm = GaussianMixture.random(dim=4, components=2, seed=1)
    seen = []

    def denoiser(x, sigma, **cond):
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype == torch.float32
        assert cond == {"label": 3}
        seen.append(float(sigma[0]))
        return gmm.denoiser(x.double(), sigma.double()).float()

    records = []
    sigmas = SCHEDULE.sigmas(6, "karras", dtype=torch.float32)
    x = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    options = {"n_steps_each": 2} if name == "annealed_langevin" else {}
    out = SAMPLERS[name](
        denoiser,
        x,
        sigmas,
        generator=torch.Generator().manual_seed(1),
        callback=records.append,
        cond={"label": 3},
        **options,
    )
    assert out.shape == x.shape and out.dtype == torch.float32 and bool(out.isfinite().all())
    assert seen and records and set(records[0]) == {"x", "i", "sigma", "sigma_next", "denoised"}


def test_every_sampler_has_a_config_and_back():
    names = {p.stem for p in CONF.glob("*.yaml")}
    assert names == set(SAMPLERS) | {"auto"}
    for path in CONF.glob("*.yaml"):
        config = yaml.safe_load(path.read_text())
        if path.stem == "auto":
            continue
        assert config["name"] == path.stem
        params = inspect.signature(SAMPLERS[path.stem]).parameters
        unknown = set(config) - GRID_KEYS - set(params)
        assert not unknown, f"{path.name}: options {unknown} are not parameters of the sampler"
        # One source of truth: the function called by name, DiffusionModel.sample("name") (which reads
        # this file) and the CLI all run the same options; the file lists every one of them.
        options = {name: p.default for name, p in params.items() if name not in CONTRACT | {"stats"}}  # stats: out
        assert {k: v for k, v in config.items() if k not in GRID_KEYS} == options, path.name
        grid_options = {k: config[k] for k in ("rho", "sigma_min", "sigma_max") if k in config}
        assert len(make_sigmas(SCHEDULE.train_sigmas, config["steps"], config["spacing"], **grid_options)) == (
            config["steps"] + 1
        )
        # switching the spacing of a karras config leaves its rho without effect, not an error
        assert len(make_sigmas(SCHEDULE.train_sigmas, 4, "logsnr", **grid_options)) == 5


def test_auto_is_the_measured_choice_for_its_steps():
    for steps in (4, 10, 20, 50):
        spec = SamplerSpec.from_config({"name": "auto", "steps": steps})
        expected = auto_config(steps)
        assert (spec.name, spec.steps, spec.spacing) == (expected["name"], steps, expected["spacing"])
        assert spec.options == {k: v for k, v in expected.items() if k not in GRID_KEYS}
        grid_options = GRID_KEYS - {"name", "steps", "spacing"}
        assert spec.spacing_options == {k: v for k, v in expected.items() if k in grid_options}
    # from 4 steps on: the SDE on Karras sigmas from sigma 20, or from the schedule's own top where that is lower
    assert auto_config(4)["sigma_max"] == 20.0 and auto_config(3)["name"] == "unipc"
    spec = SamplerSpec.from_config({"name": "auto", "steps": 10})
    assert float(spec.sigmas(SCHEDULE)[0]) == pytest.approx(20.0)
    low = LinearSchedule(beta_end=0.01)  # the seed article's schedule: its top is about 12.5
    assert low.sigma_max < 20 and float(spec.sigmas(low)[0]) == pytest.approx(low.sigma_max)
    # the packaged config and any other key override the choice; a key the choice lacks is an error
    spec = SamplerSpec.from_config({**yaml.safe_load((CONF / "auto.yaml").read_text()), "spacing": "logsnr"})
    assert spec.steps == 10 and spec.spacing == "logsnr"
    with pytest.raises(ValueError, match="has no option restart_times"):
        SamplerSpec.from_config({"name": "auto", "steps": 10, "restart_times": 2})
    # from 4 steps on the choice is stochastic (SDE-DPM-Solver++(2M)) and takes its options
    assert SamplerSpec.from_config({"name": "auto", "steps": 10, "eta": 0.5}).options["eta"] == 0.5
    # objective=ode: the closest to the ODE's map, learned from the better of two starts on its searched grid
    spec = SamplerSpec.from_config({**yaml.safe_load((CONF / "auto.yaml").read_text()), "objective": "ode"})
    assert (spec.name, spec.steps, spec.spacing) == ("learned", 10, "optimized")
    assert spec.options["form"] == "data" and list(spec.options["start_from"]) == ["unipc", "dpmpp_3m"]
    with pytest.raises(ValueError, match="sampler.objective must be one of fid, ode, got 'lpips'"):
        SamplerSpec.from_config({"name": "auto", "objective": "lpips"})


def test_nfe_counts(gmm, ode_problem):
    x, _ = ode_problem
    x = x[:8]
    expected = {
        "heun": 2 * 10 - 1,
        "euler": 10,
        "dpmpp_3m": 10,
        "unipc": 10,
        "ipndm": 10,
        "pc": 2 * 10,
        "annealed_langevin": 10 * 3 + 1,
    }
    for name, nfe in expected.items():
        counting = Counting(gmm.denoiser)
        options = {"n_steps_each": 3} if name == "annealed_langevin" else {}
        SAMPLERS[name](counting, x, karras_grid(10), generator=torch.Generator().manual_seed(0), **options)
        assert counting.calls == nfe, name


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: SCHEDULE.sigmas(0), "sampler.steps must be an integer >= 1"),
        (lambda: LinearSchedule(num_timesteps=100).sigmas(101), "more than the schedule's 100"),
        (lambda: SCHEDULE.sigmas(10, "warped"), "unknown sampler.spacing='warped'"),
        (lambda: SCHEDULE.sigmas(10, "karras", rhoo=7.0), r"unknown spacing option\(s\) \['rhoo'\]"),
        (lambda: _run("ipndm", order=5), "sampler.order=5 is not supported by ipndm; use 1..4"),
        (lambda: _run("unipc", order=4), "sampler.order=4 is not supported by unipc; use 1..3"),
        (lambda: _run("dpmpp_3m", order=0), "sampler.order=0 is not supported by dpmpp_3m; use 1..3"),
        (lambda: _run("unipc", variant="bh3"), "sampler.variant must be 'bh1' or 'bh2'"),
        (lambda: _run("euler", sigmas=torch.tensor([1.0, 2.0, 0.0])), "strictly decreasing"),
        (lambda: _run("heun", sigmas=torch.tensor([2.0, 2.0, 0.0])), "strictly decreasing"),
        (lambda: _run("ode_rk45", rtol=0.0), "sampler.rtol and sampler.atol must be > 0"),
        (lambda: get_sampler("dpm_fast"), "unknown sampler 'dpm_fast'"),
    ],
)
def test_bad_input_raises_one_line_value_error(call, message):
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def _run(name: str, sigmas: torch.Tensor | None = None, **options) -> torch.Tensor:
    sigmas = karras_grid(5) if sigmas is None else sigmas
    return SAMPLERS[name](lambda x, s, **c: x * 0, torch.randn(2, 3) * sigmas[0], sigmas, **options)


# ----------------------------------------------------------------------------- optimized spacing


def test_optimized_grid_beats_karras_on_held_out_noise(gmm):
    g = torch.Generator().manual_seed(5)
    train, test = (torch.randn(n, 4, generator=g, dtype=torch.float64) for n in (128, 512))
    sigma_max, sigma_min = 80.0, 0.002
    init = karras_grid(6, sigma_max, sigma_min)
    reference = ode_reference(gmm, test * sigma_max, sigma_max, sigma_min)
    for name in ("euler", "dpmpp_2m"):
        grid = optimize_sigmas(gmm.denoiser, train, init, name)
        assert len(grid) == len(init) and grid[0] == init[0] and grid[-1] == 0 and grid[-2] >= sigma_min
        assert bool((grid[:-1] > grid[1:]).all())
        errors = [rms(SAMPLERS[name](gmm.denoiser, test * sigma_max, s), reference) for s in (init, grid)]
        assert errors[1] < 0.8 * errors[0], f"{name}: optimized {errors[1]:.3g} vs karras {errors[0]:.3g}"


def test_optimized_start_level_moves_and_beats_the_fixed_start(gmm):
    # move_start: the search may lower the first level (the noise scaled to it, as diffusers' "leading"
    # spacing starts), scored against the ODE solution from init[0]
    g = torch.Generator().manual_seed(5)
    train, test = (torch.randn(n, 4, generator=g, dtype=torch.float64) for n in (128, 512))
    sigma_max, sigma_min = 80.0, 0.002
    reference = ode_reference(gmm, test * sigma_max, sigma_max, sigma_min)
    for steps in (3, 5):
        init = karras_grid(steps, sigma_max, sigma_min)
        fixed = optimize_sigmas(gmm.denoiser, train, init, "deis")
        moved = optimize_sigmas(gmm.denoiser, train, init, "deis", move_start=True)
        assert moved[0] < init[0] and bool((moved[:-1] > moved[1:]).all()) and moved[-2] >= sigma_min
        errors = [rms(SAMPLERS["deis"](gmm.denoiser, test * s[0], s), reference) for s in (fixed, moved)]
        assert errors[1] < 0.9 * errors[0], (steps, errors)


def test_optimized_spacing_searches_the_start_level(gmm):
    # what sampler.spacing=optimized runs: its grid may start below the schedule's top (157 here)
    spec = SamplerSpec.from_config({"name": "deis", "steps": 4, "spacing": "optimized"})
    grid = optimized_sigmas(gmm.denoiser, SCHEDULE, spec, (4,), batch_size=32)
    assert grid[0] < 0.5 * SCHEDULE.sigma_max and bool((grid[:-1] > grid[1:]).all()) and grid[-1] == 0


def test_learned_search_fits_its_trials_to_the_solution_from_the_top_to_the_end(gmm, monkeypatch):
    # spacing=optimized for learned: the trial grids may start lower and end with a higher final jump,
    # their weights must still aim at the solution the search scores against, the one from the
    # schedule's top down to its smallest level
    from fewstep.diffusion import sampling

    passed: list[tuple] = []

    def spy(**options):
        passed.append((options.get("start_sigma"), options.get("end_sigma")))
        return fitted_sampler(**options)

    monkeypatch.setattr(sampling, "fitted_sampler", spy)
    spec = SamplerSpec.from_config({"name": "learned", "steps": 2, "spacing": "optimized"})
    grid = optimized_sigmas(gmm.denoiser, SCHEDULE, spec, (4,), batch_size=8)
    assert passed == [(pytest.approx(SCHEDULE.sigma_max), SCHEDULE.sigma_min)] and grid[0] <= SCHEDULE.sigma_max


@pytest.mark.parametrize("name", LD3_SAMPLERS)
def test_ld3_solver_is_the_registered_sampler(gmm, ode_problem, name):
    # LD3 differentiates a copy of the step rule; it must be the same rule as the sampler's
    x, _ = ode_problem
    for steps in (2, 5, 16):
        grid = karras_grid(steps, SIGMA_MAX, SIGMA_MIN)
        ours = _solve_differentiably(name, {}, gmm.denoiser, x, grid, None)
        torch.testing.assert_close(ours, SAMPLERS[name](gmm.denoiser, x, grid), rtol=0, atol=1e-12)


def test_ld3_grid_beats_coordinate_descent_on_held_out_noise(gmm):
    g = torch.Generator().manual_seed(5)
    train, test = (torch.randn(n, 4, generator=g, dtype=torch.float64) for n in (128, 512))
    sigma_max, sigma_min = 80.0, 0.002
    reference = ode_reference(gmm, test * sigma_max, sigma_max, sigma_min)
    for steps in (5, 10):  # measured: Karras 0.171 / 0.153, coordinate descent 0.084 / 0.052, ld3 0.062 / 0.015
        init = karras_grid(steps, sigma_max, sigma_min)
        grids = [
            init,
            optimize_sigmas(gmm.denoiser, train, init, "dpmpp_2m"),
            ld3_sigmas(gmm.denoiser, train, init, "dpmpp_2m"),
        ]
        ld3 = grids[-1]
        assert len(ld3) == len(init) and ld3[0] == init[0] and ld3[-1] == 0 and ld3[-2] >= sigma_min
        assert bool((ld3[:-1] > ld3[1:]).all())
        karras, coordinate, learned = (
            rms(SAMPLERS["dpmpp_2m"](gmm.denoiser, test * sigma_max, s), reference) for s in grids
        )
        assert learned < 0.9 * coordinate and coordinate < 0.8 * karras, (steps, karras, coordinate, learned)


def test_ld3_soft_teacher_forcing_and_bad_input(gmm):
    train = torch.randn(16, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    init = karras_grid(4, 80.0, 0.002)
    soft = ld3_sigmas(gmm.denoiser, train, init, "dpmpp_3m", radius=0.05, iterations=20)
    assert bool((soft[:-1] > soft[1:]).all()) and soft[0] == init[0] and soft[-2] >= 0.002
    with pytest.raises(ValueError, match="ld3 supports the samplers"):
        ld3_sigmas(gmm.denoiser, train, init, "heun")
    with pytest.raises(ValueError, match="deterministic"):
        ld3_sigmas(gmm.denoiser, train, init, "ddim", options={"eta": 1.0})


def test_optimize_refuses_stochastic_sampler(gmm):
    with pytest.raises(ValueError, match="needs a deterministic sampler"):
        optimize_sigmas(
            gmm.denoiser,
            torch.randn(8, 4, dtype=torch.float64),
            karras_grid(4),
            "ddim",
            options={"eta": 1.0},
            reference_steps=8,
        )


def test_load_or_optimize_caches_json(tmp_path):
    calls = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return torch.tensor([10.0, 1.0, 0.1, 0.0])

    path = tmp_path / "cache" / "sigmas.json"
    key = {"ckpt": "last.ckpt", "sampler": "dpmpp_2m", "steps": 3, "options": {"a": (1, 2)}}
    first = load_or_optimize(path, key, compute)
    again = load_or_optimize(path, {**key, "options": {"a": [1, 2]}}, compute)
    other = load_or_optimize(path, {**key, "steps": 4}, compute)
    assert len(calls) == 2 and torch.equal(first, again) and torch.equal(first, other)
    assert path.read_text().lstrip().startswith("[")
    # the cost a caller records is stored with the value; a malformed one is only a note, never a recompute
    cost = {"network_evaluations": 7, "seconds": 0.5}
    load_or_optimize(path, {**key, "steps": 5}, compute, cost=cost)
    records = json.loads(path.read_text())
    assert records[-1]["cost"] == cost and "cost" not in records[0] and len(calls) == 3
    records[-1]["cost"] = ["not", "a", "dict"]
    path.write_text(json.dumps(records))
    assert torch.equal(load_or_optimize(path, {**key, "steps": 5}, compute), first) and len(calls) == 3
    # a stale entry (no grid) and a corrupted file are ignored with a warning and recomputed
    records = json.loads(path.read_text())
    records[0]["value"] = [1.0, 2.0]
    path.write_text(json.dumps(records))
    with pytest.warns(UserWarning, match="invalid entry"):
        assert torch.equal(load_or_optimize(path, key, compute), first)
    path.write_text('[{"key": {"ckpt": "last.c')
    with pytest.warns(UserWarning, match="unreadable cache"):
        assert torch.equal(load_or_optimize(path, key, compute), first)
    assert len(calls) == 5
    assert torch.equal(load_or_optimize(path, key, compute), first) and len(calls) == 5  # the file was mended


def test_learned_coefficients_beat_fixed_rules_on_held_out_noise():
    """Fitted on one batch of noise, the learned weights must generalise to another: at 5 and 8 steps
    their ODE error is well below that of the fixed rule they start from (DEIS log-sigma for the eps
    form, DPM-Solver++(2M) for the data form), which is what the sampler runs without coefficients."""
    mixture = GaussianMixture.random(dim=16, components=4, seed=1, spread=0.5)
    g = torch.Generator().manual_seed(0)
    fit_noise, test_noise = (torch.randn(96, 16, generator=g, dtype=torch.float64) for _ in range(2))
    ref = ode_reference(mixture, test_noise * 80.0, 80.0, SIGMA_MIN)
    for steps in (5, 8):
        sigmas = karras_grid(steps, sigma_max=80.0)
        coefficients = fit_coefficients(mixture.denoiser, fit_noise, sigmas, history=3)
        assert len(coefficients) == steps and all(len(w) == 3 for w in coefficients)
        learned = SAMPLERS["learned"](mixture.denoiser, test_noise * 80.0, sigmas, coefficients=coefficients)
        plain = SAMPLERS["learned"](mixture.denoiser, test_noise * 80.0, sigmas)
        deis = SAMPLERS["deis"](mixture.denoiser, test_noise * 80.0, sigmas, lower_order_final=False)
        torch.testing.assert_close(plain, deis)
        data_form = SAMPLERS["learned"](mixture.denoiser, test_noise * 80.0, sigmas, form="data")
        dpm = SAMPLERS["dpmpp_2m"](mixture.denoiser, test_noise * 80.0, sigmas, lower_order_final=False)
        torch.testing.assert_close(data_form, dpm)
        limit = {5: 0.65, 8: 0.75}[steps]  # measured 0.50 and 0.59
        assert rms(learned, ref) < limit * rms(deis, ref), (steps, rms(learned, ref), rms(deis, ref))
        fitted = fit_coefficients(mixture.denoiser, fit_noise, sigmas, form="data")
        learned = SAMPLERS["learned"](mixture.denoiser, test_noise * 80.0, sigmas, form="data", coefficients=fitted)
        limit = {5: 0.75, 8: 0.6}[steps]  # measured 0.63 and 0.43
        assert rms(learned, ref) < limit * rms(dpm, ref), (steps, rms(learned, ref), rms(dpm, ref))
    with pytest.raises(ValueError, match="fit them for this grid"):
        SAMPLERS["learned"](mixture.denoiser, test_noise, karras_grid(4), coefficients=coefficients)


def test_learned_from_a_fixed_samplers_weights():
    """``start_from``: a multistep sampler's own weights, read off exactly by running it on random
    denoiser outputs, make ``learned`` that sampler; the end-error refinement from them must then beat it
    on held-out noise. Samplers of another form are refused with what to change."""
    mixture = GaussianMixture.random(dim=16, components=4, seed=1, spread=0.5)
    g = torch.Generator().manual_seed(0)
    fit_noise, test_noise = (torch.randn(96, 16, generator=g, dtype=torch.float64) for _ in range(2))
    ref = ode_reference(mixture, test_noise * 80.0, 80.0, SIGMA_MIN)
    sigmas = karras_grid(5, sigma_max=80.0)
    run = functools.partial(SAMPLERS["learned"], mixture.denoiser, test_noise * 80.0, sigmas, form="data")
    for name, history in (("unipc", 3), ("dpmpp_2m", 2), ("dpmpp_3m", 3), ("ddim", 1)):
        fixed = SAMPLERS[name](mixture.denoiser, test_noise * 80.0, sigmas)
        torch.testing.assert_close(run(history=history, start_from=name), fixed, rtol=1e-9, atol=1e-9)
        weights = multistep_weights(name, sigmas, history)
        torch.testing.assert_close(run(history=history, coefficients=weights), fixed, rtol=1e-9, atol=1e-9)
    # no sequential fit: without the refinement the fitted sampler is UniPC itself
    start = fit_coefficients(mixture.denoiser, fit_noise, sigmas, form="data", start_from="unipc", refine=0)
    unipc = SAMPLERS["unipc"](mixture.denoiser, test_noise * 80.0, sigmas)
    torch.testing.assert_close(run(coefficients=start), unipc, rtol=1e-9, atol=1e-9)
    for steps, limit in ((5, 0.75), (8, 0.4)):  # measured 0.61 and 0.27
        sigmas = karras_grid(steps, sigma_max=80.0)
        unipc = rms(SAMPLERS["unipc"](mixture.denoiser, test_noise * 80.0, sigmas), ref)
        fitted = fit_coefficients(mixture.denoiser, fit_noise, sigmas, form="data", start_from="unipc")
        learned = SAMPLERS["learned"](mixture.denoiser, test_noise * 80.0, sigmas, form="data", coefficients=fitted)
        assert rms(learned, ref) < limit * unipc, (steps, rms(learned, ref), unipc)
    for options, message in (
        ({"start_from": "heun"}, "calls the network 9 times on 5 steps"),
        ({"start_from": "deis"}, "not a multistep method on the last 3 denoiser outputs"),
        ({"start_from": "unipc", "history": 2}, "raise sampler.history"),
        ({"start_from": "nope"}, "unknown sampler 'nope'"),
    ):
        with pytest.raises(ValueError, match=message):
            SAMPLERS["learned"](mixture.denoiser, test_noise, karras_grid(5), form="data", **options)
    with pytest.raises(ValueError, match="set sampler.form=data"):
        SAMPLERS["learned"](mixture.denoiser, test_noise, karras_grid(5), start_from="unipc")


def test_start_errors_rank_fitted_samplers_as_the_exact_solution_does():
    """``start_from=[...]`` keeps the fitted sampler whose result is closest to the ODE solution on
    held-out noise: the errors ``start_errors`` measures against its fine DPM-Solver++(3M) solution are
    the errors to the exact one, each candidate on its own grid (lowered starts included)."""
    mixture = GaussianMixture.random(dim=16, components=4, seed=1, spread=0.5)
    noise = torch.randn(64, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = ode_reference(mixture, noise * 80.0, 80.0, SIGMA_MIN)
    candidates = {
        "unipc": karras_grid(6, sigma_max=80.0),
        "dpmpp_3m": karras_grid(6, sigma_max=30.0),  # starts below the top: scored against the solution from it
        "ddim": karras_grid(5, sigma_max=80.0),
    }
    candidates = {name: (g, multistep_weights(name, g, 3)) for name, g in candidates.items()}
    errors = start_errors(mixture.denoiser, noise, candidates, start_sigma=80.0, end_sigma=SIGMA_MIN)
    direct = {
        name: rms(SAMPLERS[name](mixture.denoiser, noise * g[0], g), exact) for name, (g, _) in candidates.items()
    }
    per_pixel = {name: error / math.sqrt(mixture.dim) for name, error in direct.items()}  # (rms: per sample)
    assert errors == pytest.approx(per_pixel, rel=1e-3), (errors, per_pixel)
    assert min(errors, key=errors.get) == min(direct, key=direct.get)
    with pytest.raises(ValueError, match="a choice made when fitting"):
        SAMPLERS["learned"](mixture.denoiser, noise, karras_grid(5), form="data", start_from=["unipc", "ddim"])
    with pytest.raises(ValueError, match="fits from one sampler"):
        fit_coefficients(mixture.denoiser, noise, karras_grid(5), form="data", start_from=["unipc", "ddim"])
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        SAMPLERS["learned"](mixture.denoiser, noise, karras_grid(5), form="data", start_from=["unipc", "nope"])
    # a list of one is that sampler
    one = SAMPLERS["learned"](mixture.denoiser, noise * 80.0, karras_grid(5, 80.0), form="data", start_from=["unipc"])
    torch.testing.assert_close(one, SAMPLERS["unipc"](mixture.denoiser, noise * 80.0, karras_grid(5, 80.0)))


def test_grid_searched_with_the_fit_beats_the_fixed_rules_grid():
    """``spacing=optimized`` for ``learned`` searches the grid for the *fitted* sampler (its weights
    refitted to every trial grid), not for the fixed rule: on held-out noise that gives a lower error
    than fitting the weights to the fixed rule's best grid."""
    mixture = GaussianMixture.random(dim=16, components=4, seed=1, spread=0.5)
    g = torch.Generator().manual_seed(0)
    fit_noise, test_noise = (torch.randn(96, 16, generator=g, dtype=torch.float64) for _ in range(2))
    ref = ode_reference(mixture, test_noise * 80.0, 80.0, SIGMA_MIN)
    calls = Counting(mixture.denoiser)
    run = fitted_sampler()
    grid = karras_grid(3, sigma_max=80.0)
    x = run(calls, fit_noise * 80.0, grid)  # a fit (16 * 2 + 1 + 3 calls), then the run (3)
    assert calls.calls == 16 * 2 + 1 + 3 + 3
    weights = fit_coefficients(mixture.denoiser, fit_noise, grid, refine=0)  # the search fits without refinement
    torch.testing.assert_close(x, SAMPLERS["learned"](mixture.denoiser, fit_noise * 80.0, grid, coefficients=weights))
    for steps, limit in ((5, 0.9), (8, 0.85)):  # measured 0.81 and 0.73
        init = karras_grid(steps, sigma_max=80.0)
        errors = []
        for sampler in ("learned", run):  # the fixed rule's grid (DEIS), then the fitted sampler's
            grid = optimize_sigmas(mixture.denoiser, fit_noise, init, sampler)
            weights = fit_coefficients(mixture.denoiser, fit_noise, grid)
            out = SAMPLERS["learned"](mixture.denoiser, test_noise * 80.0, grid, coefficients=weights)
            errors.append(rms(out, ref))
        assert errors[1] < limit * errors[0], (steps, errors)


def test_learned_weights_on_a_lowered_start_aim_at_the_solution_from_the_top():
    """A searched grid may start below the top (the noise scaled to its first level). Its weights are
    fitted with ``start_sigma`` = the top: the fit's targets are then the ODE solution from the top,
    which the grid is scored against, not the solution from the grid's own start; the fitted sampler
    of the grid search passes it on."""
    mixture = GaussianMixture.random(dim=16, components=4, seed=1, spread=0.5)
    noise = torch.randn(32, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = karras_grid(5, sigma_max=10.0)
    exact = ode_reference(mixture, noise * 80.0, 80.0, float(sigmas[-2]))  # from the top, denoised at the end
    from_top = fine_trajectory(mixture.denoiser, noise * 80.0, sigmas.tolist(), start_sigma=80.0)
    from_start = fine_trajectory(mixture.denoiser, noise * 10.0, sigmas.tolist())
    assert len(from_top) == len(from_start) == 6  # the 5 positive levels, then the denoised end
    torch.testing.assert_close(from_top[-1], exact, atol=1e-3, rtol=0)
    assert rms(from_start[-1], exact) > 0.05  # 0.099: a different solution: fitting to it aims elsewhere
    weights = fit_coefficients(mixture.denoiser, noise, sigmas, start_sigma=80.0, refine=0)
    assert weights != fit_coefficients(mixture.denoiser, noise, sigmas, refine=0)
    out = fitted_sampler(start_sigma=80.0)(mixture.denoiser, noise * 10.0, sigmas)
    torch.testing.assert_close(out, SAMPLERS["learned"](mixture.denoiser, noise * 10.0, sigmas, coefficients=weights))
    # a top that differs from the grid's first level by rounding only (sigma_max against a Karras grid's
    # first level) is that level, not an interval of length ~0 that the fine solver would refuse
    top = float(sigmas[0]) * (1 + 1e-15)
    rounded = fine_trajectory(mixture.denoiser, noise * top, sigmas.tolist(), start_sigma=top)
    torch.testing.assert_close(rounded, from_start)


def test_learned_weights_aim_at_the_end_of_the_ode_not_the_denoised_last_level():
    """A trailing or searched grid's last positive level can be high (~0.5 on the networks), and the
    denoiser's output there is a blurred mean, not where the ODE ends. With ``end_sigma`` (the library
    passes the schedule's smallest level) the fit's end target is the ODE solution continued down to
    it, then denoised; the states along the way are unchanged, the fitted sampler of the grid search
    passes the option on, and on held-out noise the weights so fitted end closer to the ODE's end."""
    mixture = GaussianMixture.random(dim=16, components=4, seed=1, spread=0.5)
    noise, held_out = (torch.randn(64, 16, generator=torch.Generator().manual_seed(k)).double() for k in (0, 1))
    sigmas = torch.tensor([80.0, 10.0, 3.0, 1.0, 0.0], dtype=torch.float64)  # the final jump from sigma 1
    exact = ode_reference(mixture, noise * 80.0, 80.0, 0.002)
    to_end = fine_trajectory(mixture.denoiser, noise * 80.0, sigmas.tolist(), end_sigma=0.002)
    at_level = fine_trajectory(mixture.denoiser, noise * 80.0, sigmas.tolist())
    assert len(to_end) == len(at_level) == 5  # the 4 positive levels, then the end
    torch.testing.assert_close(to_end[:-1], at_level[:-1])
    assert rms(to_end[-1], exact) < 5e-3  # 6.9e-4
    assert rms(at_level[-1], exact) > 0.2  # 0.29
    weights = fit_coefficients(mixture.denoiser, noise, sigmas, end_sigma=0.002, refine=0)
    old = fit_coefficients(mixture.denoiser, noise, sigmas, refine=0)
    target = ode_reference(mixture, held_out * 80.0, 80.0, 0.002)
    run = functools.partial(SAMPLERS["learned"], mixture.denoiser, held_out * 80.0, sigmas)
    errors = [rms(run(coefficients=w), target) for w in (weights, old)]
    assert errors[0] < 0.5 * errors[1], errors  # 0.056 against 0.28
    out = fitted_sampler(end_sigma=0.002)(mixture.denoiser, noise * 80.0, sigmas)
    torch.testing.assert_close(out, SAMPLERS["learned"](mixture.denoiser, noise * 80.0, sigmas, coefficients=weights))


def test_joint_refinement_lowers_held_out_error_and_keeps_what_it_cannot_beat():
    """``fit_coefficients`` refines the sequential fit on the end error (L-BFGS through the solve): on
    held-out noise that lowers the error; it keeps the sequential weights when they do better on the
    quarter of the batch the refinement did not see; chunking the batch leaves the gradient as it is."""
    mixture = GaussianMixture.random(dim=16, components=4, seed=1, spread=0.5)
    g = torch.Generator().manual_seed(0)
    fit_noise, test_noise = (torch.randn(96, 16, generator=g, dtype=torch.float64) for _ in range(2))
    ref = ode_reference(mixture, test_noise * 80.0, 80.0, SIGMA_MIN)
    for steps, limit in ((4, 0.65), (8, 0.9)):  # measured 0.51 and 0.80
        sigmas = karras_grid(steps, sigma_max=80.0)
        sequential, refined = (fit_coefficients(mixture.denoiser, fit_noise, sigmas, refine=r) for r in (0, 40))
        errors = [
            rms(SAMPLERS["learned"](mixture.denoiser, test_noise * 80.0, sigmas, coefficients=c), ref)
            for c in (sequential, refined)
        ]
        assert errors[1] < limit * errors[0], (steps, errors)

    class Scaled(torch.nn.Module):  # a denoiser with parameters: the refinement must leave their .grad alone
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.float64))

        def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return self.scale * mixture.denoiser(x, sigma)

    net, x = Scaled(), fit_noise * 80.0  # on the loop's last grid (8 steps) and its step-by-step weights
    trajectory = fine_trajectory(net, x, sigmas.tolist())
    few_steps = [refine_coefficients(net, x, sigmas, sequential, trajectory, iterations=5, chunk=c) for c in (7, 96)]
    torch.testing.assert_close(torch.tensor(few_steps[0]), torch.tensor(few_steps[1]), rtol=1e-9, atol=1e-12)
    assert few_steps[0] != sequential and net.scale.grad is None
    # the held-out quarter's targets are where the sequential weights end: nothing can beat them there
    states: list[torch.Tensor] = []
    end = SAMPLERS["learned"](net, x, sigmas, coefficients=sequential, callback=lambda info: states.append(info["x"]))
    doctored = [t.clone() for t in trajectory]
    for level, state in enumerate([*states, end]):
        doctored[level][72:] = state[72:]
    assert refine_coefficients(net, x, sigmas, sequential, doctored) == sequential


def test_dynamic_threshold():
    x0 = torch.tensor([[0.5, -0.2, 0.9, 0.1], [3.0, -1.5, 0.0, 0.5]])
    out = dynamic_threshold(x0, percentile=1.0)
    torch.testing.assert_close(out, torch.tensor([[0.5, -0.2, 0.9, 0.1], [1.0, -0.5, 0.0, 0.5 / 3]]))
    wrapped = DynamicThreshold(lambda x, sigma: 4 * x, percentile=0.9)
    sigmas = karras_grid(4)
    sample = SAMPLERS["dpmpp_2m"](wrapped, torch.randn(3, 1, 4, 4) * sigmas[0], sigmas.float())
    assert float(sample.abs().max()) <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="percentile"):
        DynamicThreshold(wrapped, percentile=0.0)
