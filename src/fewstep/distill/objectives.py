"""Distillation objectives: what a student learns from a frozen teacher denoiser.

Both take denoisers on the contract (``D(x, sigma[batch], **cond) -> x0_hat``): the student's with
gradients, the teacher's (possibly classifier-free guided: the student then needs one pass) without.

- :class:`ProgressiveDistillation` (Salimans & Ho 2022): one student DDIM step matches two of the
  teacher's; rounds halve the step count, each student becoming the next teacher.
- :class:`ConsistencyDistillation` (Song et al. 2023, with the improvements of Song & Dhariwal 2023):
  the student's consistency function at sigma_{n+1} matches the target network's at the teacher's
  one ODE step down, sigma_n; ``teacher=None`` is consistency training (no teacher).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from fewstep.diffusion.schedules import Schedule
from fewstep.samplers import get_sampler

Denoiser = Callable[..., Tensor]


def _per_sample(sigma: Tensor, x: Tensor) -> Tensor:
    return sigma.reshape(-1, *[1] * (x.ndim - 1)).to(x)


class ConsistencyFunction:
    """``f(x, sigma) = c_skip(sigma) x + c_out(sigma) D(x, sigma)`` with ``f(x, sigma_min) = x``.

    The boundary condition of Song et al. 2023 (their Eq. 7 with EDM's sigma_data = 0.5), on the
    distance to sigma_min stretched by ``scaling`` (10, as in latent consistency models): c_out is
    ~1 above sigma ~0.1, so a student initialised from the teacher starts at the teacher's denoiser.
    """

    def __init__(self, denoiser: Denoiser, sigma_min: float, sigma_data: float = 0.5, scaling: float = 10.0) -> None:
        self.denoiser, self.sigma_min, self.sigma_data, self.scaling = denoiser, sigma_min, sigma_data, scaling

    def coefficients(self, sigma: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        s = (_per_sample(sigma, x) - self.sigma_min).clamp(min=0) * self.scaling
        c_skip = self.sigma_data**2 / (s**2 + self.sigma_data**2)
        return c_skip, s / (s**2 + self.sigma_data**2).sqrt()

    def __call__(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        c_skip, c_out = self.coefficients(sigma, x)
        return c_skip * x + c_out * self.denoiser(x, sigma, **cond)


class ProgressiveDistillation:
    """Salimans & Ho 2022, Algorithm 2, in the contract's VE form x = x0 + sigma n.

    At a student grid level sigma (step i of ``steps``), the teacher takes two DDIM steps
    sigma -> sigma_mid -> sigma'' on the grid of 2 x ``steps``; the student's x0 target is the one
    that makes a single DDIM step land there: ``x'' = x0~ + (sigma''/sigma)(x - x0~)``, so
    ``x0~ = (x'' - (sigma''/sigma) x) / (1 - sigma''/sigma)`` (their Alg. 2's x~ in VE form). The loss
    is the x0 MSE with their truncated-SNR weight ``max(SNR, 1) = max(1 / sigma^2, 1)``.
    """

    def __init__(self, schedule: Schedule, steps: int, spacing: str = "trailing") -> None:
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"distillation.steps must be an integer >= 1, got {steps!r}")
        self.schedule, self.steps, self.spacing = schedule, steps, spacing
        self.student_sigmas = schedule.sigmas(steps, spacing, dtype=torch.float64)
        self.teacher_sigmas = schedule.sigmas(2 * steps, spacing, dtype=torch.float64)
        if not torch.allclose(self.teacher_sigmas[::2], self.student_sigmas):
            raise ValueError(
                f"the {spacing} grids of {steps} and {2 * steps} steps are not nested; use a power-of-2 step count"
            )

    def loss(
        self,
        student: Denoiser,
        teacher: Denoiser,
        x0: Tensor,
        cond: Mapping | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        cond = dict(cond or {})
        i = torch.randint(0, self.steps, (len(x0),), generator=generator, device=x0.device)
        grid = self.teacher_sigmas.to(x0.device)
        sigma, mid, end = grid[2 * i].to(x0.dtype), grid[2 * i + 1].to(x0.dtype), grid[2 * i + 2].to(x0.dtype)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x = x0 + _per_sample(sigma, x0) * noise
        with torch.no_grad():
            d = teacher(x, sigma, **cond)
            x_mid = d + _per_sample(mid / sigma, x) * (x - d)
            d = teacher(x_mid, mid, **cond)
            x_end = d + _per_sample(end / mid, x) * (x_mid - d)
            ratio = _per_sample(end / sigma, x)
            target = (x_end - ratio * x) / (1 - ratio)
        weight = _per_sample((1 / sigma**2).clamp(min=1), x)
        return (weight * (student(x, sigma, **cond) - target) ** 2).mean()


class ConsistencyDistillation:
    """Consistency distillation (Song et al. 2023, Algorithm 2) with improved consistency training's
    choices that need no LPIPS (Song & Dhariwal 2023): Karras levels, a discretisation curriculum
    ``N(k) = min(s0 2^floor(k / K'), s1) + 1`` (their Eq. 9, ``K' = floor(K / (log2(s1/s0) + 1))``),
    levels drawn by the log-normal weighting of their Sec. 3.5, pseudo-Huber distance
    ``sqrt(|d|^2 + c^2) - c`` with ``c = 0.00054 sqrt(dim)`` and weight ``1 / (sigma_{n+1} - sigma_n)``.

    The teacher's ODE step sigma_{n+1} -> sigma_n is one step of any deterministic fewstep sampler
    (``solver``: heun, euler, dpmpp_2m; a multistep solver's single step is its first-order one).
    Without a teacher (consistency training) the lower point is ``x0 + sigma_n z`` with the same z.
    The batch is split into ``groups`` that each draw a level (a sampler runs one grid per call).
    """

    def __init__(
        self,
        sigma_min: float,
        sigma_max: float,
        total_steps: int,
        solver: str = "heun",
        rho: float = 7.0,
        s0: int = 10,
        s1: int = 1280,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        groups: int = 4,
    ) -> None:
        get_sampler(solver)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < distillation.sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"the curriculum needs trainer.max_steps >= 1, got {total_steps!r}")
        self.sigma_min, self.sigma_max, self.solver, self.rho = float(sigma_min), float(sigma_max), solver, rho
        self.s0, self.s1, self.p_mean, self.p_std, self.groups = s0, s1, p_mean, p_std, max(1, int(groups))
        self.stage_steps = max(1, total_steps // (int(math.log2(s1 / s0)) + 1))

    def discretisation(self, step: int) -> int:
        """N(k): the number of levels at training step k (iCT Eq. 9)."""
        return min(self.s0 * 2 ** (step // self.stage_steps), self.s1) + 1

    def levels(self, count: int) -> Tensor:
        """Karras levels, increasing: sigma_1 = sigma_min < ... < sigma_N = sigma_max."""
        ramp = torch.linspace(0, 1, count, dtype=torch.float64)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (lo + ramp * (hi - lo)) ** self.rho

    def level_probabilities(self, levels: Tensor) -> Tensor:
        """p(n) proportional to the log-normal mass between sigma_n and sigma_{n+1} (iCT Sec. 3.5)."""
        cdf = torch.erf((levels.log() - self.p_mean) / (math.sqrt(2) * self.p_std))
        mass = (cdf[1:] - cdf[:-1]).clamp(min=1e-12)
        return mass / mass.sum()

    def loss(
        self,
        student: Denoiser,
        target: Denoiser,
        teacher: Denoiser | None,
        x0: Tensor,
        step: int,
        cond: Mapping | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``student`` / ``target``: the consistency functions of the student and of the target network."""
        cond = dict(cond or {})
        levels = self.levels(self.discretisation(step))
        probabilities = self.level_probabilities(levels)
        huber_c = 0.00054 * math.sqrt(x0[0].numel())
        solve = get_sampler(self.solver)
        losses = []
        for rows in torch.arange(len(x0), device=x0.device).chunk(self.groups):
            n = int(torch.multinomial(probabilities, 1, generator=generator))
            low, high = float(levels[n]), float(levels[n + 1])
            x0_g = x0[rows]
            cond_g = {k: v[rows] if torch.is_tensor(v) and v.ndim and len(v) == len(x0) else v for k, v in cond.items()}
            noise = torch.randn(x0_g.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_high = x0_g + high * noise
            with torch.no_grad():
                if teacher is None:
                    x_low = x0_g + low * noise
                else:
                    grid = torch.tensor([high, low], dtype=torch.float64)
                    x_low = solve(teacher, x_high, grid, cond=cond_g)
                sigma_low = torch.full((len(rows),), low, dtype=x0.dtype, device=x0.device)
                aim = target(x_low, sigma_low, **cond_g)
            sigma_high = torch.full((len(rows),), high, dtype=x0.dtype, device=x0.device)
            diff = (student(x_high, sigma_high, **cond_g) - aim).flatten(1)
            distance = (diff.pow(2).sum(1) + huber_c**2).sqrt() - huber_c
            losses.append(distance / (high - low))
        return torch.cat(losses).mean()
