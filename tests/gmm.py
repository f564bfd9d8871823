"""A Gaussian mixture with its exact denoiser: ground truth for sampler tests and benchmarks.

Data x0 ~ sum_k w_k N(mu_k, diag(s_k^2)); noisy x = x0 + sigma n. Then x | k ~ N(mu_k, diag(s_k^2 + sigma^2))
and the exact denoiser (the posterior mean, the optimum of the denoising loss) is

    D(x, sigma) = E[x0 | x] = sum_k p(k | x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


class GaussianMixture:
    def __init__(self, weights: Tensor, means: Tensor, stds: Tensor) -> None:
        self.weights = weights.double() / weights.sum()
        self.means = means.double()  # [K, d]
        self.stds = stds.double().expand_as(self.means)  # [K, d]

    @classmethod
    def random(cls, dim: int, components: int, seed: int = 0, spread: float = 2.0) -> GaussianMixture:
        g = torch.Generator().manual_seed(seed)
        weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
        means = spread * torch.randn(components, dim, generator=g, dtype=torch.float64)
        stds = 0.3 + 0.4 * torch.rand(components, dim, generator=g, dtype=torch.float64)
        return cls(weights, means, stds)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> Tensor:
        return self.weights @ self.means

    def cov(self) -> Tensor:
        centred = self.means - self.mean()
        within = torch.diag(self.weights @ self.stds**2)
        return within + centred.T @ (self.weights[:, None] * centred)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k] * noise

    def responsibilities(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        """p(k | x) at noise level sigma ([B] or scalar), for flat x [B, d]."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
        var = self.stds.to(x) ** 2 + sigma**2  # [B or 1, K, d]
        diff = x[:, None, :] - self.means.to(x)
        log_p = -0.5 * (diff**2 / var + var.log() + math.log(2 * math.pi)).sum(-1) + self.weights.to(x).log()
        return torch.softmax(log_p, dim=-1)

    def denoiser(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        """Exact E[x0 | x] for x of any shape [B, ...] with prod(...) = dim, sigma [B]."""
        flat = x.reshape(len(x), -1)
        s2 = self.stds.to(flat) ** 2
        sig2 = sigma.to(flat).reshape(-1, 1, 1) ** 2
        resp = self.responsibilities(flat, sigma.to(flat))
        means = self.means.to(flat)
        post = means + s2 / (s2 + sig2) * (flat[:, None, :] - means)
        return (resp[:, :, None] * post).sum(1).reshape(x.shape)


def ode_reference(gmm: GaussianMixture, x: Tensor, sigma_start: float, sigma_end: float, tol: float = 1e-11) -> Tensor:
    """Exact PF-ODE map from sigma_start to sigma_end > 0 followed by the denoiser: what every sampler's
    grid [sigma_start, ..., sigma_end, 0] approximates. scipy's DOP853 in t = log sigma."""
    from scipy.integrate import solve_ivp

    shape = x.shape

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(y).reshape(shape)
        sigma = torch.full((shape[0],), math.exp(t), dtype=torch.float64)
        return (xt - gmm.denoiser(xt, sigma)).reshape(-1).numpy()

    sol = solve_ivp(
        rhs, (math.log(sigma_start), math.log(sigma_end)), x.double().reshape(-1).numpy(), "DOP853", rtol=tol, atol=tol
    )
    assert sol.success, sol.message
    end = torch.from_numpy(sol.y[:, -1]).reshape(shape)
    return gmm.denoiser(end, torch.full((shape[0],), sigma_end, dtype=torch.float64))


class Gaussian:
    """Data x0 ~ N(mu, Sigma), full covariance: D(x, sigma) = mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu),
    and the conditional of any block given the rest is Gaussian in closed form."""

    def __init__(self, mean: Tensor, cov: Tensor) -> None:
        self.mu, self.cov = mean.double(), cov.double()

    @classmethod
    def random(cls, dim: int, seed: int = 0, low: float = 0.3, high: float = 1.5) -> Gaussian:
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        eig = low + (high - low) * torch.rand(dim, generator=g, dtype=torch.float64)
        return cls(torch.randn(dim, generator=g, dtype=torch.float64) * 0.5, q @ torch.diag(eig) @ q.T)

    @property
    def dim(self) -> int:
        return len(self.mu)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.mu + z @ torch.linalg.cholesky(self.cov).T

    def denoiser(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        flat = x.reshape(len(x), -1).double()
        eye = torch.eye(self.dim, dtype=torch.float64)
        out = torch.empty_like(flat)
        for value in sigma.unique():  # one solve per distinct level (a batch shares one)
            rows = sigma == value
            gain = self.cov @ torch.linalg.inv(self.cov + float(value) ** 2 * eye)
            out[rows] = self.mu + (flat[rows] - self.mu) @ gain.T
        return out.to(x.dtype).reshape(x.shape)

    def conditional(self, fill: Tensor, known_values: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and covariance of the ``fill`` coordinates (bool [dim]) given the others' values."""
        k = ~fill
        s_fk = self.cov[fill][:, k]
        gain = s_fk @ torch.linalg.inv(self.cov[k][:, k])
        mean = self.mu[fill] + gain @ (known_values - self.mu[k])
        return mean, self.cov[fill][:, fill] - gain @ s_fk.T
