"""Editing and inpainting (fewstep.tasks) against exact answers.

A Gaussian data distribution has an exact denoiser, and the distribution of a masked block given
the known block is Gaussian in closed form; a Gaussian mixture gives the exact probability-flow
ODE for inversion (tests/gmm.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gmm import Gaussian, GaussianMixture
from test_samplers import rms

from fewstep.diffusion.sampling import CountingDenoiser
from fewstep.samplers import SAMPLERS, SampleGenerators
from fewstep.samplers.spacing import karras
from fewstep.tasks import check_mask, edit, inpaint, invert, load_mask, make_masks, sdedit, start_index

TABLE = torch.ones(1000)  # karras() only checks steps against the table length


def karras_grid(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> torch.Tensor:
    sigmas = karras(TABLE, steps, sigma_min=sigma_min, sigma_max=sigma_max)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).double()


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------ inpainting
GAUSS = Gaussian.random(8, seed=1)
FILL = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0], dtype=torch.bool)  # a 2x4 "image"; 1 = fill


def gaussian_inpainting(n: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n inpaintings of one image's masked block; the filled values and the exact conditional."""
    x0 = GAUSS.sample(1, torch.Generator().manual_seed(5))[0]
    image = x0.reshape(1, 1, 2, 4).expand(n, 1, 2, 4).clone()
    mask = FILL.double().reshape(1, 1, 2, 4)
    out = inpaint(GAUSS.denoiser, image, mask, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(out.reshape(n, -1)[:, ~FILL], image.reshape(n, -1)[:, ~FILL])  # known pixels kept exactly
    mean, cov = GAUSS.conditional(FILL, x0[~FILL])
    return out.reshape(n, -1)[:, FILL], mean, cov


def test_corrected_replacement_matches_the_exact_conditional():
    """Replacement with Langevin correctors (score-SDE's predictor-corrector inpainting) converges to
    p(masked | known); mean within 4 standard errors, covariance within sampling error."""
    n = 4000
    filled, mean, cov = gaussian_inpainting(n, sigmas=karras_grid(100), method="replace", sampler="pc", n_corrector=5)
    z = (filled.mean(0) - mean) / (cov.diag() / n).sqrt()
    assert float(z.abs().max()) < 4, z
    assert float((torch.cov(filled.T) - cov).norm() / cov.norm()) < 0.08


def test_plain_replacement_is_biased_and_correctors_fix_it():
    """Why the correctors matter: plain replacement with DDPM steps misses the conditional mean by
    many standard errors on correlated data (a known limitation of the method)."""
    n = 2000
    filled, mean, cov = gaussian_inpainting(n, sigmas=karras_grid(100), method="replace", sampler="ddpm")
    z = (filled.mean(0) - mean) / (cov.diag() / n).sqrt()
    assert float(z.abs().max()) > 4


@pytest.mark.parametrize("method", ["replace", "repaint", "ddnm"])
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddpm", "heun"])
def test_every_method_runs_with_any_sampler_and_keeps_known_pixels(method, sampler):
    filled, mean, cov = gaussian_inpainting(64, sigmas=karras_grid(4), method=method, sampler=sampler, resample=2)
    assert torch.isfinite(filled).all()
    # even 4 steps land in the conditional's bulk (its spread is ~1; the unconditional mean is far off)
    assert float((filled.mean(0) - mean).abs().max()) < 3 * float(cov.diag().sqrt().max())


def test_resampling_costs_resample_times_the_steps():
    image = torch.zeros(2, 1, 2, 4, dtype=torch.float64)
    mask = FILL.double().reshape(1, 1, 2, 4)
    counter = CountingDenoiser(GAUSS.denoiser)
    inpaint(counter, image, mask, karras_grid(20), method="repaint", sampler="ddpm")  # defaults 10 x 10
    assert counter.calls == 20 * 10
    counter.calls = 0
    inpaint(counter, image, mask, karras_grid(20), method="ddnm", sampler="ddim", jump_length=5, resample=3)
    assert counter.calls == 20 * 3


def test_deterministic_ddnm_is_reproducible_with_per_sample_generators():
    image = GAUSS.sample(3, torch.Generator().manual_seed(2)).reshape(3, 1, 2, 4)
    mask = FILL.double().reshape(1, 1, 2, 4)

    def run(seeds: list[int]) -> torch.Tensor:
        return inpaint(GAUSS.denoiser, image[: len(seeds)], mask, karras_grid(8), generator=SampleGenerators(seeds))

    # image 0 with seed 11 is the same whether it is inpainted alone or in a batch (to rounding)
    torch.testing.assert_close(run([11, 12, 13])[:1], run([11]), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(run([11]), run([12])[:1])


# ------------------------------------------------------------------------------------ inversion
GMM = GaussianMixture.random(dim=4, components=3, seed=0, spread=1.0)
DATA = GMM.sample(256, torch.Generator().manual_seed(1))

# (sampler, step counts, the order the round trip must at least show)
ROUND_TRIP = [
    ("ddim", 1),
    ("euler", 1),
    ("heun", 2),
    ("dpmpp_2m", 2),
    ("dpmpp_3m", 3),
    ("unipc", 3),
    ("ipndm", 3),
    ("deis", 2),
]


@pytest.mark.parametrize(("name", "order"), ROUND_TRIP)
def test_invert_then_generate_returns_the_input_at_the_solvers_order(name, order):
    steps = [16, 32, 64]
    errors = []
    for n in steps:
        grid = karras_grid(n, sigma_min=0.01, sigma_max=20.0)
        latent = invert(GMM.denoiser, DATA, grid, sampler=name)
        errors.append(rms(SAMPLERS[name](GMM.denoiser, latent, grid), DATA))
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert slope > order - 0.35, f"{name}: slope {slope:.2f}, errors {errors}"
    assert errors[-1] < (0.1 if order == 1 else 2e-3)


def test_inversion_costs_what_generation_costs_and_partial_inversion():
    grid = karras_grid(40, sigma_min=0.01, sigma_max=20.0)
    counter = CountingDenoiser(GMM.denoiser)
    latent = invert(counter, DATA, grid, sampler="dpmpp_2m")
    assert counter.calls == 40
    # strength 0.5: the latent at sigmas[20], from which the last 20 steps come back
    counter.calls = 0
    half = invert(counter, DATA, grid, sampler="dpmpp_2m", strength=0.5)
    assert counter.calls == 20 and not torch.allclose(half, latent)
    assert rms(SAMPLERS["dpmpp_2m"](GMM.denoiser, half, grid[20:]), DATA) < 0.01


@pytest.mark.parametrize(
    ("sampler", "options", "message"),
    [
        ("ddpm", {}, "sampler 'ddpm' is stochastic or integrates downwards only and cannot invert"),
        ("ode_rk45", {}, "cannot invert"),
        ("ddim", {"eta": 0.5}, "ddim with eta=0.5 adds noise and cannot invert; set sampler.eta=0.0"),
        ("heun", {"s_churn": 10.0}, "set sampler.s_churn=0.0"),
    ],
)
def test_stochastic_sampler_cannot_invert(sampler, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        invert(GMM.denoiser, DATA[:2], karras_grid(5), sampler=sampler, **options)


def test_samplers_refuse_noise_on_an_upward_grid():
    up = karras_grid(5)[:-1].flip(0)
    with pytest.raises(ValueError, match="eta must be 0 on an increasing"):
        SAMPLERS["ddim"](GMM.denoiser, DATA[:2], up, eta=1.0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        SAMPLERS["ddpm"](GMM.denoiser, DATA[:2], up)


# ------------------------------------------------------------------------------------ SDEdit, edit
def test_sdedit_runs_the_strengths_share_of_the_grid_and_trades_faithfulness():
    grid = karras_grid(10, sigma_min=0.01, sigma_max=20.0)
    distance = {}
    for strength, steps in [(0.2, 2), (0.5, 5), (1.0, 10)]:
        counter = CountingDenoiser(GMM.denoiser)
        out = sdedit(counter, DATA, strength, grid, sampler="dpmpp_2m", generator=torch.Generator().manual_seed(0))
        assert counter.calls == steps
        distance[strength] = rms(out, DATA)
    assert distance[0.2] < distance[0.5] < distance[1.0]
    assert start_index(10, 0.01) == 9  # at least one step


def class_denoiser(x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact E[x0 | x, class y]: component y's posterior mean."""
    s2 = GMM.stds**2
    post = GMM.means + s2 / (s2 + sigma.reshape(-1, 1, 1) ** 2) * (x[:, None, :] - GMM.means)
    return post[torch.arange(len(x)), y]


def test_edit_moves_an_image_to_the_target_class():
    """Invert a sample of class 0 with its label, regenerate with label 2: the result lies in
    component 2, and regenerating with the source label gives the input back."""
    n = 64
    source = torch.zeros(n, dtype=torch.long)
    images = GMM.means[0] + GMM.stds[0] * torch.randn(
        n, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    grid = karras_grid(32, sigma_min=0.01, sigma_max=20.0)
    moved = edit(class_denoiser, images, grid, source={"y": source}, target={"y": source + 2}, sampler="dpmpp_2m")
    nearest = (moved[:, None, :] - GMM.means).div(GMM.stds).pow(2).sum(-1).argmin(1)
    assert float((nearest == 2).double().mean()) > 0.95
    same = edit(class_denoiser, images, grid, source={"y": source}, target={"y": source}, sampler="dpmpp_2m")
    assert rms(same, images) < 1e-2


# ------------------------------------------------------------------------------------ masks
def test_masks_and_their_errors(tmp_path):
    image = torch.zeros(2, 1, 8, 8)
    for kind, share in [("center", 0.25), ("half", 0.5)]:
        assert float(make_masks(kind, 2, 8).mean()) == share
    strokes = make_masks("random", 4, 32, seed=1)
    assert not torch.equal(strokes[0], strokes[1]) and torch.equal(strokes, make_masks("random", 4, 32, seed=1))
    assert 0.05 < float(strokes.mean()) < 0.6
    with pytest.raises(ValueError, match="the mask is 4x4 but the image is 8x8"):
        check_mask(torch.ones(4, 4), image)
    with pytest.raises(ValueError, match=r"only 0 \(keep\) and 1 \(fill\)"):
        check_mask(torch.full((8, 8), 0.3), image)
    with pytest.raises(ValueError, match="marks no pixel to fill"):
        check_mask(torch.zeros(8, 8), image)
    with pytest.raises(ValueError, match="marks every pixel to fill"):
        check_mask(torch.ones(8, 8), image)
    with pytest.raises(ValueError, match="unknown mask 'box'"):
        make_masks("box", 1, 8)
    from PIL import Image

    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((8, 8), 128, dtype=np.uint8)).save(grey)
    with pytest.raises(ValueError, match="not binary after thresholding at 0.5"):
        load_mask(grey, (8, 8))
    box = tmp_path / "box.png"
    Image.fromarray((make_masks("center", 1, 16)[0, 0].numpy() * 255).astype(np.uint8)).save(box)
    with pytest.raises(ValueError, match="give one of their size or resize=true"):
        load_mask(box, (8, 8))
    assert torch.equal(load_mask(box, (8, 8), resize=True)[0, 0], make_masks("center", 1, 8)[0, 0])


def test_bad_arguments():
    image, mask, grid = DATA[:2].reshape(2, 1, 2, 2), torch.tensor([[1.0, 0.0], [0.0, 0.0]]), karras_grid(4)
    for strength in (0.0, 1.5, -1):
        with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
            sdedit(GMM.denoiser, image, strength, grid)
    with pytest.raises(ValueError, match="unknown inpainting method 'blend'"):
        inpaint(GMM.denoiser, image, mask, grid, method="blend")
    with pytest.raises(ValueError, match="resample must be an integer >= 1"):
        inpaint(GMM.denoiser, image, mask, grid, resample=0)
