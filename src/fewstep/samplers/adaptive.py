"""Adaptive probability-flow ODE solver: Dormand-Prince 5(4) with error control, in torch.

Song et al. 2021 (Sec. 4.3) solve the PF-ODE with scipy's RK45; this is the same method written
in torch so it runs on the model's device. It integrates ``dx/dsigma = (x - D(x, sigma)) / sigma``
in the variable ``t = log sigma``, where it reads ``dx/dt = x - D(x, e^t)``: the solution varies
on the same scale over every octave of sigma, so the controller does not have to crawl through
the small-sigma end.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fewstep.samplers.registry import batch_sigma, check_sigmas, register

# Dormand & Prince 1980, "A family of embedded Runge-Kutta formulae", Table 2 (RK5(4)7M).
_C = [0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0]
_A = [
    [],
    [1 / 5],
    [3 / 40, 9 / 40],
    [44 / 45, -56 / 15, 32 / 9],
    [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
    [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
]
_B = [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]  # 5th order; also row 7 of A (FSAL)
_E = [71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40]  # 5th minus 4th order


@register("ode_rk45")
@torch.no_grad()
def sample_ode_rk45(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    cond: dict | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    max_nfe: int = 10_000,
    stats: dict | None = None,
) -> Tensor:
    """Adaptive RK45 (Dormand-Prince) on the PF-ODE from ``sigmas[0]`` to ``sigmas[-2]``, then the
    denoiser output there (free: the last stage already evaluated it). Only the grid's end points
    matter. Step control as in Hairer, Norsett & Wanner, Solving ODEs I, Sec. II.4: a step is
    accepted when every sample's RMS of ``err / (atol + rtol max(|x|, |x'|))`` is <= 1, and
    the next step is scaled by ``0.9 err^(-1/5)`` within [0.2, 10]. The batch shares one step size.

    Pass ``stats={}`` to read back ``nfe`` (denoiser calls), ``steps`` and ``rejected``; the callback
    sees every accepted step. A grid ending above 0 is integrated to its end and not denoised.
    """
    if rtol <= 0 or atol <= 0:
        raise ValueError(f"sampler.rtol and sampler.atol must be > 0, got {rtol} and {atol}")
    sigmas = check_sigmas(sigmas, x)
    s = sigmas.tolist()
    t0, t1 = math.log(s[0]), math.log(s[-1] if s[-1] > 0 else s[-2])
    nfe, accepted, rejected = 0, 0, 0

    def f(y: Tensor, t: float) -> Tensor:
        nonlocal nfe
        if nfe >= max_nfe:
            raise RuntimeError(f"ode_rk45 needed more than sampler.max_nfe={max_nfe} calls; loosen rtol/atol")
        nfe += 1
        sigma = torch.tensor(math.exp(t), dtype=y.dtype, device=y.device)
        return y - denoiser(y, batch_sigma(sigma, y), **(cond or {}))

    def norm(e: Tensor, y0: Tensor, y1: Tensor) -> float:
        scaled = e / (atol + rtol * torch.maximum(y0.abs(), y1.abs()))
        return float(scaled.flatten(1).pow(2).mean(1).sqrt().max())

    k1, t = f(x, t0), t0
    span = abs(t1 - t0)
    if span > 0:  # initial step: Hairer et al. Sec. II.4, "Starting step size"
        d0, d1 = norm(x, x, x), norm(k1, x, x)
        h0 = 1e-6 if min(d0, d1) < 1e-5 else 0.01 * d0 / d1
        h0 = min(h0, span)
        d2 = norm(f(x - h0 * k1, t0 - h0) - k1, x, x) / h0
        h = min(100 * h0, (0.01 / max(d1, d2)) ** 0.2 if max(d1, d2) > 1e-15 else max(1e-6, h0 * 1e-3), span)
    while t > t1:
        h = min(h, t - t1)  # integrate downwards in t: the step is -h
        ks = [k1]
        for j in range(1, 6):
            ks.append(f(x - h * sum(a * k for a, k in zip(_A[j], ks, strict=False)), t - _C[j] * h))
        x_new = x - h * sum(b * k for b, k in zip(_B, ks, strict=True))
        t_new = t1 if h == t - t1 else t - h
        ks.append(f(x_new, t_new))
        err = norm(h * sum(e * k for e, k in zip(_E, ks, strict=True)), x, x_new)
        if err <= 1:
            if callback is not None:
                sigma = torch.tensor(math.exp(t), dtype=x.dtype, device=x.device)
                sigma_next = torch.tensor(math.exp(t_new), dtype=x.dtype, device=x.device)
                callback({"x": x, "i": accepted, "sigma": sigma, "sigma_next": sigma_next, "denoised": x - k1})
            x, t, k1 = x_new, t_new, ks[-1]
            accepted += 1
            h *= min(10.0, 0.9 * err**-0.2) if err > 0 else 10.0
        else:
            rejected += 1
            h *= max(0.2, 0.9 * err**-0.2)
        if h < 1e-12 * max(span, 1.0):
            raise RuntimeError("ode_rk45: step size underflow; the denoiser may return non-finite values")
    if stats is not None:
        stats.update(nfe=nfe, steps=accepted, rejected=rejected)
    return x - k1 if s[-1] == 0 else x  # k1 = x - D(x, sigmas[-2]) by FSAL
