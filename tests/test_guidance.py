"""Classifier-free guidance and the sampling loop, against a class-conditional Gaussian mixture.

Class k of the data is component k of a Gaussian mixture, so both denoisers are exact: the
conditional one is component k's posterior mean, the unconditional one the mixture's. Through
the guidance wrapper every sampler must see exactly ``D_u + w (D_c - D_u)``.
"""

from __future__ import annotations

import pytest
import torch
from gmm import GaussianMixture

from fewstep.callbacks import FID
from fewstep.diffusion import ClassifierFreeGuidance, LinearSchedule
from fewstep.diffusion.sampling import (
    Guidance,
    SamplerSpec,
    generate,
    iter_generate,
    resolve_batch_size,
    sample_seeds,
)
from fewstep.samplers import SAMPLERS

K = 3
GMM = GaussianMixture.random(dim=4, components=K, seed=1)
SIGMAS = LinearSchedule().sigmas(6, "karras", dtype=torch.float64)
# every sampler with options that keep it short; stochastic ones draw from the same generator in both runs
OPTIONS = {"annealed_langevin": {"n_steps_each": 2}, "pc": {"n_corrector": 1}, "ode_rk45": {"max_nfe": 400}}


def class_denoiser(x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact E[x0 | x, y]: component y's posterior mean; the null label K gives the mixture's."""
    s2 = GMM.stds**2
    post = GMM.means + s2 / (s2 + sigma.reshape(-1, 1, 1) ** 2) * (x[:, None, :] - GMM.means)  # [B, K, d]
    conditional = post[torch.arange(len(x)), y.clamp(max=K - 1)]
    return torch.where((y == K)[:, None], GMM.denoiser(x, sigma), conditional)


def exact_guided(scale: float):
    def denoiser(x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d_cond, d_uncond = class_denoiser(x, sigma, y), GMM.denoiser(x, sigma)
        return d_uncond + scale * (d_cond - d_uncond)

    return denoiser


def run(name: str, denoiser, y: torch.Tensor) -> torch.Tensor:
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * SIGMAS[0]
    generator = torch.Generator().manual_seed(1)
    return SAMPLERS[name](denoiser, x, SIGMAS, generator=generator, cond={"y": y}, **OPTIONS.get(name, {}))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_guided_denoiser_is_the_exact_combination_for_every_sampler(name):
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    null = {"y": torch.tensor([K])}
    for scale in (0.0, 1.0, 2.5):
        guided = run(name, ClassifierFreeGuidance(class_denoiser, scale, null), y)
        assert torch.allclose(guided, run(name, exact_guided(scale), y), rtol=1e-10, atol=1e-10), scale
    # the ends of the scale are the plain models, bit for bit: one network evaluation, no combination
    assert torch.equal(run(name, ClassifierFreeGuidance(class_denoiser, 1.0, null), y), run(name, class_denoiser, y))
    unconditional = run(name, lambda x, s, y: GMM.denoiser(x, s), y)
    assert torch.equal(run(name, ClassifierFreeGuidance(class_denoiser, 0.0, null), y), unconditional)


def test_guidance_interval_guides_only_inside():
    x = torch.randn(4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    guided = ClassifierFreeGuidance(class_denoiser, 3.0, {"y": torch.tensor([K])}, sigma_min=0.5, sigma_max=2.0)
    sigma = torch.tensor([0.1, 0.5, 1.0, 5.0], dtype=torch.float64)  # below, at the (open) lower edge, inside, above
    out = guided(x, sigma, y=y)
    conditional, combined = class_denoiser(x, sigma, y), exact_guided(3.0)(x, sigma, y)
    inside = torch.tensor([False, False, True, False])
    assert torch.allclose(out[inside], combined[inside]) and torch.equal(out[~inside], conditional[~inside])


def test_counting_guided_evaluations_and_per_sample_seeds():
    schedule = LinearSchedule()
    spec = SamplerSpec.from_config({"name": "ddpm", "steps": 5, "spacing": "trailing"})
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    guidance = Guidance(2.0, {"y": torch.tensor([K])}, sigma_max=10.0)
    kwargs = {"cond": {"y": y}, "guidance": guidance, "seed": 7}
    whole = generate(class_denoiser, schedule, spec, (4,), 7, batch_size=7, **kwargs)
    # 5 steps, of which those at sigma <= 10 are guided (2 evaluations each)
    guided_steps = int((spec.sigmas(schedule)[:-1] <= 10).sum())
    assert whole.nfe == 5 + guided_steps
    # a sample depends on (seed, index) only: any batch size, any split of the indices across "ranks"
    batched = generate(class_denoiser, schedule, spec, (4,), 7, batch_size=3, **kwargs)
    assert torch.equal(whole.images, batched.images)
    tail = generate(
        class_denoiser,
        schedule,
        spec,
        (4,),
        3,
        batch_size=2,
        first_index=4,
        cond={"y": y[4:]},
        guidance=guidance,
        seed=7,
    )
    assert torch.equal(whole.images[4:], tail.images)
    assert len(set(sample_seeds(7, range(1000)))) == 1000
    # batch_size=auto (the default of sample.py and the FID callback): 64 at a time on a CPU
    many = {**kwargs, "cond": {"y": torch.arange(70) % 3}}  # its first 7 labels are y
    batches = list(iter_generate(class_denoiser, schedule, spec, (4,), 70, **many))
    assert [len(b.images) for b in batches] == [64, 6]
    assert torch.equal(batches[0].images[:7], whole.images)


def test_sampling_batch_size_auto_and_bad_values():
    assert resolve_batch_size("auto", "cpu") == 64 and resolve_batch_size(None, torch.device("cpu")) == 64
    assert resolve_batch_size("auto", "cuda:1") == 256 and resolve_batch_size(5, "cuda") == 5
    for bad in (0, -3, "big", 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1 or auto"):
            resolve_batch_size(bad, "cpu")
    with pytest.raises(ValueError, match="^callbacks.fid.batch_size must be an integer >= 1 or auto, got 0$"):
        FID(batch_size=0)


def test_guidance_rejects_bad_settings():
    with pytest.raises(ValueError, match="scale must be >= 0"):
        ClassifierFreeGuidance(class_denoiser, -1.0, {"y": torch.tensor([K])})
    with pytest.raises(ValueError, match="sigma_min < guidance.sigma_max"):
        ClassifierFreeGuidance(class_denoiser, 2.0, {"y": torch.tensor([K])}, sigma_min=3.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="null condition"):
        Guidance(2.0, None).wrap(class_denoiser)
