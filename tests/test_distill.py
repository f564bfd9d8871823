"""Distillation against exact answers: on a Gaussian mixture the teacher is the exact denoiser, so
two teacher DDIM steps and the probability-flow ODE flow map are known (tests/gmm.py). A small MLP
student trained for a few hundred steps must move measurably toward them."""

from __future__ import annotations

import copy

import pytest
import torch
from gmm import GaussianMixture, ode_reference

from fewstep.diffusion import LinearSchedule
from fewstep.distill import ConsistencyDistillation, ConsistencyFunction, ProgressiveDistillation
from fewstep.distill.training import check_distillation
from fewstep.samplers import SAMPLERS

GMM = GaussianMixture.random(dim=4, components=3, seed=0, spread=1.0)


def teacher(x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
    return GMM.denoiser(x.double(), sigma.double()).to(x.dtype)


class MLPDenoiser(torch.nn.Module):
    """EDM-preconditioned MLP (sigma_data = 1): starts as the Gaussian denoiser c_skip x."""

    def __init__(self, dim: int = 4, width: int = 128) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim + 1, width), torch.nn.SiLU(), torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, dim),
        )  # fmt: skip
        torch.nn.init.zeros_(self.net[-1].weight)
        torch.nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        s = sigma.reshape(-1, 1).to(x)
        c_skip, c_out, c_in = 1 / (s**2 + 1), s / (s**2 + 1).sqrt(), 1 / (s**2 + 1).sqrt()
        return c_skip * x + c_out * self.net(torch.cat([x * c_in, s.log() / 4], 1))


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).sum(1).mean().sqrt())


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)  # the MLP students' initial weights


def test_one_progressive_round_matches_two_teacher_steps_on_held_out_noise():
    distill = ProgressiveDistillation(LinearSchedule(), steps=4)
    student = MLPDenoiser()
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(600):
        loss = distill.loss(student, teacher, GMM.sample(256, generator).float(), generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    noise = torch.randn(2000, 4, generator=torch.Generator().manual_seed(9)) * distill.student_sigmas[0].float()
    with torch.no_grad():
        teacher_8 = SAMPLERS["ddim"](teacher, noise.double(), distill.teacher_sigmas)
        teacher_4 = SAMPLERS["ddim"](teacher, noise.double(), distill.teacher_sigmas[::2])
        student_4 = SAMPLERS["ddim"](student, noise, distill.student_sigmas.float())
    # the student's 4 steps land where the teacher's 8 do, much closer than the teacher's own 4 steps
    assert rms(student_4, teacher_8) < 0.6 * rms(teacher_4, teacher_8)


def test_consistency_distillation_moves_toward_the_exact_ode_map():
    sigma_min, sigma_max, steps = 0.002, 20.0, 600
    distill = ConsistencyDistillation(sigma_min, sigma_max, total_steps=steps, solver="heun")
    net = MLPDenoiser()
    target_net = copy.deepcopy(net).requires_grad_(False)
    student, target = ConsistencyFunction(net, sigma_min), ConsistencyFunction(target_net, sigma_min)
    noise = torch.randn(2000, 4, generator=torch.Generator().manual_seed(9)).double() * sigma_max
    exact = ode_reference(GMM, noise, sigma_max, sigma_min)
    top = torch.full((len(noise),), sigma_max)

    def one_step_error() -> float:
        with torch.no_grad():
            return rms(student(noise.float(), top), exact)

    before = one_step_error()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        loss = distill.loss(student, target, teacher, GMM.sample(256, generator).float(), step, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(target_net.parameters()), list(net.parameters()), 0.1)
    assert one_step_error() < 0.4 * before  # the 1-step map moves toward the exact ODE endpoint
    # two steps (Song et al. 2023, Alg. 1) sample the data distribution better than one
    data = GMM.sample(2000, torch.Generator().manual_seed(3))
    grid = torch.tensor([sigma_max, sigma_min, 0.0])
    with torch.no_grad():
        one = SAMPLERS["consistency"](student, noise.float(), grid[[0, 2]])
        two = SAMPLERS["consistency"](student, noise.float(), grid, levels=[3.0], generator=torch.Generator())
    assert energy_distance(two, data) < energy_distance(one, data)


def test_curriculum_and_level_weights():
    distill = ConsistencyDistillation(0.002, 80.0, total_steps=800)
    # N(k) doubles from s0 + 1 = 11 up to s1 + 1 = 1281 over the run (iCT Eq. 9)
    counts = [distill.discretisation(k) for k in range(0, 800, 100)]
    assert counts[0] == 11 and counts == sorted(counts) and distill.discretisation(10**6) == 1281
    levels = distill.levels(11)
    assert float(levels[0]) == pytest.approx(0.002) and float(levels[-1]) == pytest.approx(80.0)
    probabilities = distill.level_probabilities(levels)
    assert float(probabilities.sum()) == pytest.approx(1.0)
    # the log-normal weighting favours levels near exp(-1.1) ~ 0.33 over the extremes
    assert int(probabilities.argmax()) not in (0, len(probabilities) - 1)


def test_consistency_function_boundary():
    f = ConsistencyFunction(lambda x, sigma: torch.zeros_like(x), sigma_min=0.01)
    x = torch.randn(3, 4)
    assert torch.equal(f(x, torch.full((3,), 0.01)), x)  # f(x, sigma_min) = x
    assert float(f(x, torch.full((3,), 5.0)).abs().max()) < 1e-3 * float(x.abs().max())  # ~D at high noise


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"method": "progressive"}, "progressive distillation needs a teacher: teacher=PATH"),
        ({"method": "consistency", "teacher": None}, "consistency distillation needs a teacher"),
        ({"method": "consistency_training", "teacher": "t.ckpt"}, "learns without a teacher"),
        ({"method": "progressive", "teacher": "t.ckpt", "teacher_steps": 8, "rounds": 4}, "use 1..3 rounds"),
        ({"method": "progressive", "teacher": "t.ckpt", "teacher_steps": 12}, "power of 2"),
        ({"method": "distil"}, "unknown distillation.method 'distil'"),
    ],
)
def test_bad_distillation_config(config, message):
    with pytest.raises(ValueError, match=message):
        check_distillation(config)


def test_consistency_training_needs_no_teacher():
    """method=consistency_training: the lower point is x0 + sigma_n z with the same z (no ODE step)."""
    distill = ConsistencyDistillation(0.002, 20.0, total_steps=10)
    net = MLPDenoiser()
    student = ConsistencyFunction(net, 0.002)
    target = ConsistencyFunction(copy.deepcopy(net).requires_grad_(False), 0.002)
    loss = distill.loss(student, target, None, GMM.sample(64).float(), step=0)
    loss.backward()
    assert torch.isfinite(loss) and float(loss) > 0
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in net.parameters())
