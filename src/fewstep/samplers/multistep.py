"""Multistep solvers of the probability-flow ODE: DPM-Solver++(2M/3M), UniPC, iPNDM and DEIS.

They reuse the denoiser outputs of earlier steps, so a higher order costs no extra network calls.
With ``lambda = -log sigma`` the VE PF-ODE ``dx/dsigma = (x - D) / sigma`` has the exact solution
(DPM-Solver++, Lu et al. 2022b, Eq. 9 with alpha = 1)

    x_t = (sigma_t / sigma_s) x_s + sigma_t * integral_{lambda_s}^{lambda_t} e^lambda D(x_lambda, lambda) d lambda,

and the exponential integrators below replace D by a polynomial in lambda through past outputs.
With ``h = lambda_t - lambda_s`` and ``D(lambda_s + u) = sum_k D^(k) u^k / k!`` the integral is
``sum_k c_k(h) h^k D^(k) / k!`` with ``c_0 = 1 - e^-h`` and ``c_k = 1 - k c_{k-1} / h``.

Coefficients are scalars, so they are computed in Python floats (double precision) whatever the
dtype of ``x``. A step to sigma = 0 (h = inf) is always the plain denoiser output, the exact limit
of every step formula here; the higher-order terms would be 0 * inf.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from fewstep.samplers.registry import batch_sigma, check_sigmas, register


def _check_order(name: str, order: int, max_order: int) -> None:
    if not isinstance(order, int) or not 1 <= order <= max_order:
        raise ValueError(f"sampler.order={order!r} is not supported by {name}; use 1..{max_order}")


def _step_order(i: int, steps: int, order: int, lower_order_final: bool) -> int:
    """Order of step ``i`` of ``steps``: warm up with the i + 1 outputs seen so far, and with
    ``lower_order_final`` on grids of fewer than 15 steps, fall back on the final steps
    (DPM-Solver++, Lu et al. 2022b, Sec. 5 / their reference code), which steadies few-step sampling."""
    k = min(order, i + 1)
    if lower_order_final and steps < 15:
        k = min(k, steps - i)
    return k


@register("dpmpp_2m")
@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    cond: dict | None = None,
    lower_order_final: bool = True,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2), data prediction, second order.

    ``x' = (sigma'/sigma) x - (e^-h - 1) [(1 + 1/(2r)) D_i - 1/(2r) D_{i-1}]``, ``r = h_{i-1} / h_i``;
    the first step is DPM-Solver++(1) = DDIM.
    """
    sigmas = check_sigmas(sigmas, x, upward=True)
    s, steps = sigmas.tolist(), len(sigmas) - 1
    old, h_old = None, 0.0
    for i in range(steps):
        denoised = denoiser(x, batch_sigma(sigmas[i], x), **(cond or {}))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised})
        if s[i + 1] == 0:
            x = denoised
            continue
        h = math.log(s[i] / s[i + 1])
        d = denoised
        if old is not None and _step_order(i, steps, 2, lower_order_final) == 2:
            r = h_old / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        x = (s[i + 1] / s[i]) * x - math.expm1(-h) * d
        old, h_old = denoised, h
    return x


@register("dpmpp_3m")
@torch.no_grad()
def sample_dpmpp_3m(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    cond: dict | None = None,
    order: int = 3,
    lower_order_final: bool = True,
) -> Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022b, multistep third order, data prediction).

    Taylor form of the exponential integrator (module docstring) to third order:
    ``x' = (sigma'/sigma) x + c_0 D_i + c_1 (h D') + (c_2 / 2) (h^2 D'')`` with the derivatives from
    divided differences of the last three outputs (non-uniform in lambda):
    ``hD' ~ D1_0 + r0 (D1_0 - D1_1) / (r0 + r1)``, ``h^2 D'' ~ 2 (D1_0 - D1_1) / (r0 + r1)``,
    ``D1_0 = (D_i - D_{i-1}) / r0``, ``D1_1 = (D_{i-1} - D_{i-2}) / r1``, ``r_k = h_{i-1-k} / h``.
    The factor 2 in ``h^2 D''`` matters: without it the method is only second order.
    ``order`` = 1 (DDIM) or 2 (Taylor 2M) are available for comparison.
    """
    _check_order("dpmpp_3m", order, 3)
    sigmas = check_sigmas(sigmas, x, upward=True)
    s, steps = sigmas.tolist(), len(sigmas) - 1
    ds: list[Tensor] = []
    lams: list[float] = []
    for i in range(steps):
        denoised = denoiser(x, batch_sigma(sigmas[i], x), **(cond or {}))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised})
        if s[i + 1] == 0:
            x = denoised
            continue
        ds, lams = [*ds, denoised][-3:], [*lams, -math.log(s[i])][-3:]
        h = math.log(s[i] / s[i + 1])
        c0 = -math.expm1(-h)
        c1 = 1 - c0 / h
        c2 = 1 - 2 * c1 / h
        x = (s[i + 1] / s[i]) * x + c0 * denoised
        k = _step_order(i, steps, order, lower_order_final)
        if k >= 2:
            r0 = (lams[-1] - lams[-2]) / h
            d1_0 = (ds[-1] - ds[-2]) / r0
            if k == 2:
                x = x + c1 * d1_0
            else:
                r1 = (lams[-2] - lams[-3]) / h
                d2 = 2 * (d1_0 - (ds[-2] - ds[-3]) / r1) / (r0 + r1)
                x = x + c1 * (d1_0 + (r0 / 2) * d2) + (c2 / 2) * d2
    return x


def _unipc_coefficients(h: float, rs: list[float], variant: str) -> tuple[float, list[float]]:
    """B(h) and the a_m solving ``sum_m a_m r_m^(k-1) = -c_k(h) / B(h)``, k = 1..len(rs)
    (UniPC, Zhao et al. 2023, Eq. 8 / Theorem 3.1, in the data-prediction form).

    With a single difference UniPC takes a_1 = 1/2, the h -> 0 limit of the solution, which keeps
    the order and is where bh1 and bh2 differ; a solved system makes B(h) cancel out.
    """
    b = -h if variant == "bh1" else math.expm1(-h)
    if len(rs) == 1:
        return b, [0.5]
    c, rhs = -math.expm1(-h), []
    for k in range(1, len(rs) + 1):
        c = 1 - k * c / h
        rhs.append(-c / b)
    mat = torch.tensor([[r ** (k - 1) for r in rs] for k in range(1, len(rs) + 1)], dtype=torch.float64)
    return b, torch.linalg.solve(mat, torch.tensor(rhs, dtype=torch.float64)).tolist()


def _unipc_update(
    x: Tensor, s: float, s_next: float, ds: list[Tensor], lams: list[float], d_next: Tensor | None, variant: str
) -> Tensor:
    """One UniP step from (s, x) with outputs ``ds`` (newest, at s, last), or UniC when ``d_next``
    (the output at the end of the step) is given: ``x' = (s'/s) x + c_0 D_0 - B(h) sum_m a_m (D_m - D_0) / r_m``."""
    lam = -math.log(s)
    h = math.log(s / s_next)
    rs = [(lm - lam) / h for lm in lams[:-1]]
    diffs = [(d - ds[-1]) / r for d, r in zip(ds[:-1], rs, strict=True)]
    if d_next is not None:
        rs.append(1.0)
        diffs.append(d_next - ds[-1])
    x = (s_next / s) * x - math.expm1(-h) * ds[-1]
    if diffs:
        b, coefs = _unipc_coefficients(h, rs, variant)
        x = x - b * sum(a * d for a, d in zip(coefs, diffs, strict=True))
    return x


@register("unipc")
@torch.no_grad()
def sample_unipc(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    cond: dict | None = None,
    order: int = 2,
    variant: str = "bh2",
    corrector: bool = True,
    lower_order_final: bool = True,
) -> Tensor:
    """UniPC (Zhao et al. 2023, Algorithm 1 multistep, data prediction, B(h) variants bh1 = h, bh2 = e^h - 1).

    The predictor UniP-p uses the last p outputs (order p). The corrector UniC re-does the step
    just taken with the output at its end, which was needed anyway for the next step, so it costs
    no network call and lifts the order to p + 1 (their Theorem 3.3). No correction follows the
    final step (it would need an extra call).
    """
    _check_order("unipc", order, 3)
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"sampler.variant must be 'bh1' or 'bh2', got {variant!r}")
    sigmas = check_sigmas(sigmas, x, upward=True)
    s, steps = sigmas.tolist(), len(sigmas) - 1
    ds: list[Tensor] = []
    lams: list[float] = []
    x_prev, k_prev = x, 0
    for i in range(steps):
        denoised = denoiser(x, batch_sigma(sigmas[i], x), **(cond or {}))
        if corrector and ds and s[i + 1] > 0:
            x = _unipc_update(x_prev, s[i - 1], s[i], ds[-k_prev:], lams[-k_prev:], denoised, variant)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised})
        if s[i + 1] == 0:
            x = denoised
            continue
        ds, lams = [*ds, denoised][-order:], [*lams, -math.log(s[i])][-order:]
        k = _step_order(i, steps, order, lower_order_final)
        x_prev, k_prev = x, k
        x = _unipc_update(x, s[i], s[i + 1], ds[-k:], lams[-k:], None, variant)
    return x


# Adams-Bashforth weights on a uniform grid, newest output first (the classic iPNDM table).
_AB = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


@register("ipndm")
@torch.no_grad()
def sample_ipndm(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    cond: dict | None = None,
    order: int = 4,
    variable_step: bool = False,
    lower_order_final: bool = True,
) -> Tensor:
    """Improved PNDM (Zhang & Chen 2023, DEIS, Sec. 5 / Eq. 19): Adams-Bashforth on the eps form
    ``dx/dsigma = eps(x, sigma) = (x - D) / sigma``, warmed up with lower orders instead of PNDM's
    Runge-Kutta steps.

    The classic iPNDM weights (55, -59, 37, -9)/24 assume equal steps; on a Karras or log-SNR grid
    that caps the order at 2. ``variable_step=True`` integrates the polynomial through the past eps
    at their actual sigmas instead, which is DEIS's rho-AB in the VE parameterisation (their Eq. 15
    with rho = sigma) and equals the classic weights on a uniform grid. The classic weights are the
    default: below 20 NFE on Karras grids they are 2-4x more accurate (docs/samplers.md), the
    higher order of rho-AB only pays off from about 50 NFE.
    """
    _check_order("ipndm", order, 4)
    sigmas = check_sigmas(sigmas, x, upward=True)
    s, steps = sigmas.tolist(), len(sigmas) - 1
    eps_hist: list[Tensor] = []  # newest first
    for i in range(steps):
        denoised = denoiser(x, batch_sigma(sigmas[i], x), **(cond or {}))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised})
        if s[i + 1] == 0:
            x = denoised
            continue
        eps_hist = [(x - denoised) / s[i], *eps_hist[: order - 1]]
        k = _step_order(i, steps, order, lower_order_final)
        if variable_step:  # DEIS's rho-AB weights, as a mean over the step
            integrals = _deis_weights([s[i - j] for j in range(k)], s[i], s[i + 1], "sigma")
            weights = [w / (s[i + 1] - s[i]) for w in integrals]
        else:
            weights = _AB[k]
        x = x + (s[i + 1] - s[i]) * sum(w * e for w, e in zip(weights, eps_hist[:k], strict=True))
    return x


_GAUSS8 = [(float(z), float(w) / 2) for z, w in zip(*np.polynomial.legendre.leggauss(8), strict=True)]
DEIS_VARIABLES = ("sigma", "log_sigma")


def _deis_weights(nodes: list[float], a: float, b: float, variable: str) -> list[float]:
    """``w_j = integral_a^b L_j(u) dsigma/du du`` over the step, ``u`` = sigma or log sigma, with
    ``L_j`` the Lagrange basis on ``nodes`` (the past outputs' u, newest first); 8-point
    Gauss-Legendre: exact for sigma, error ~1e-15 for the smooth ``e^u`` of log sigma."""
    weights = []
    for j, nj in enumerate(nodes):
        total = 0.0
        for z, w in _GAUSS8:
            u = (a + b) / 2 + (b - a) / 2 * z
            basis = math.prod((u - nm) / (nj - nm) for m, nm in enumerate(nodes) if m != j)
            total += w * basis * (math.exp(u) if variable == "log_sigma" else 1.0)
        weights.append(total * (b - a))
    return weights


@register("deis")
@torch.no_grad()
def sample_deis(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    cond: dict | None = None,
    order: int = 3,
    variable: str = "log_sigma",
    lower_order_final: bool = True,
) -> Tensor:
    """DEIS (Zhang & Chen 2023, Sec. 4 / Eq. 15): the exponential integrator of the eps form
    ``dx/dsigma = eps(x, sigma)`` with eps extrapolated by the polynomial through the last ``order``
    outputs *in the integration variable* ``u``, integrated exactly:
    ``x' = x + sum_j eps_j integral L_j(u) dsigma/du du``.

    ``variable="sigma"`` is their rho-AB in the VE form (= ``ipndm`` with ``variable_step=True``);
    ``"log_sigma"`` polynomials in ``log sigma`` (their "log-rho" variant, diffusers' default DEIS),
    which follow eps far better on geometric and Karras grids at few steps. The variable matters as
    much as the order: docs/samplers.md measures both. Warm-up with lower orders; a step to 0 is
    the denoiser output.
    """
    _check_order("deis", order, 4)
    if variable not in DEIS_VARIABLES:
        raise ValueError(f"sampler.variable must be one of {', '.join(DEIS_VARIABLES)}, got {variable!r}")
    sigmas = check_sigmas(sigmas, x, upward=True)
    s, steps = sigmas.tolist(), len(sigmas) - 1
    to_u = math.log if variable == "log_sigma" else float
    eps_hist: list[Tensor] = []  # newest first
    for i in range(steps):
        denoised = denoiser(x, batch_sigma(sigmas[i], x), **(cond or {}))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised})
        if s[i + 1] == 0:
            x = denoised
            continue
        eps_hist = [(x - denoised) / s[i], *eps_hist[: order - 1]]
        k = _step_order(i, steps, order, lower_order_final)
        weights = _deis_weights([to_u(s[i - j]) for j in range(k)], to_u(s[i]), to_u(s[i + 1]), variable)
        x = x + sum(w * e for w, e in zip(weights, eps_hist[:k], strict=True))
    return x
