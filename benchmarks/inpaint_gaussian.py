"""How far each inpainting method lands from the exact conditional distribution, on Gaussian data.

    python benchmarks/inpaint_gaussian.py [--n 4000]

Data x0 ~ N(mu, Sigma) in 8 dimensions (a 2x4 "image", correlated, eigenvalues 0.3-1.5) has an exact
denoiser, and the masked block given the known block is Gaussian in closed form (tests/gmm.py). For
one image, n inpaintings per method; printed: the largest |z| of the sample mean of the filled pixels
against the exact conditional mean (z in standard errors: about 2 or less is exact within noise)
and the relative Frobenius error of their covariance (sampling noise alone ~0.03 at n = 4000).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gmm import Gaussian  # noqa: E402

from fewstep.diffusion.sampling import CountingDenoiser  # noqa: E402
from fewstep.samplers.spacing import karras  # noqa: E402
from fewstep.tasks import inpaint  # noqa: E402

FILL = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0], dtype=torch.bool)


def grid(steps: int) -> torch.Tensor:
    sigmas = karras(torch.ones(1000), steps, sigma_min=0.002, sigma_max=80.0)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).double()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=4000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gauss = Gaussian.random(8, seed=1)
    x0 = gauss.sample(1, torch.Generator().manual_seed(5))[0]
    mean, cov = gauss.conditional(FILL, x0[~FILL])
    image = x0.reshape(1, 1, 2, 4).expand(args.n, 1, 2, 4).clone()
    mask = FILL.double().reshape(1, 1, 2, 4)
    cases = [
        ("ddnm", "dpmpp_2m", {}),
        ("replace", "dpmpp_2m", {}),
        ("ddnm", "ddpm", {}),
        ("replace", "ddpm", {}),
        ("repaint (j2, r2)", "ddpm", {"method": "repaint", "jump_length": 2, "resample": 2}),
        ("replace + corrector", "pc", {"n_corrector": 1}),
    ]
    print(f"{'method':22s} {'sampler':9s} {'NFE':>5s} {'max |z| mean':>13s} {'cov rel err':>12s}")
    for label, sampler, options in cases:
        for nfe in (5, 10, 20, 50, 200, 1000):
            per_step = 2 if sampler == "pc" else 1
            per_step *= options.get("resample", 1)
            steps = max(1, nfe // per_step)
            counter = CountingDenoiser(gauss.denoiser)
            kwargs = {"method": label.split(" ")[0], **options}
            out = inpaint(
                counter, image, mask, grid(steps), sampler=sampler, generator=torch.Generator().manual_seed(0), **kwargs
            )
            filled = out.reshape(args.n, -1)[:, FILL]
            z = (filled.mean(0) - mean) / (cov.diag() / args.n).sqrt()
            err = (torch.cov(filled.T) - cov).norm() / cov.norm()
            print(f"{label:22s} {sampler:9s} {counter.calls:5d} {float(z.abs().max()):13.1f} {float(err):12.3f}")


if __name__ == "__main__":
    main()
