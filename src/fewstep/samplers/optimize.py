"""The ``optimized`` spacing: a sampling grid tuned to one model and one sampler.

In the spirit of Align Your Steps (Sabour et al. 2024), which moves the few grid points of a
sampler to where they help a given model most. AYS minimises a KL upper bound by stochastic
search; here the objective is direct and deterministic: the RMS distance between the sampler's
result on the grid and a fine-step reference solution of the same PF-ODE (same starting noise,
a small batch), minimised by coordinate descent on ``log sigma`` of every level but the first
(and of the first too with ``move_start``: the sampler may start lower, from the scaled noise).

Each trial moves one level a fraction ``delta`` of the way towards a neighbour, so the grid stays
strictly decreasing without constraints; ``delta`` halves after a sweep without gain. Searching
is costly (up to ``2 (steps - 1)`` sampler runs per sweep), so results are meant to be cached per
checkpoint with :func:`load_or_optimize`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.samplers.registry import check_sigmas, get_sampler

log = logging.getLogger(__name__)


def _karras(sigma_max: float, sigma_min: float, steps: int, rho: float = 7.0) -> Tensor:
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _start_grids(init: Tensor | Sequence[Tensor], what: str) -> tuple[list[Tensor], float, float]:
    """The grids a search starts from (float64, checked, sharing exactly their first level), that
    first level and the floor (the lowest last positive level among them)."""
    probe = torch.empty(0, dtype=torch.float64)
    grids = [check_sigmas(g.double().cpu().clone(), probe) for g in ([init] if isinstance(init, Tensor) else init)]
    first = float(grids[0][0]) if grids else 0.0
    if not grids or any(float(g[-1]) != 0 or len(g) != len(grids[0]) or abs(g[0] / first - 1) > 1e-9 for g in grids):
        raise ValueError(f"the grids to {what} must end in 0 and share their length and first level")
    for g in grids:
        g[0] = first  # the same start for all, exactly
    return grids, first, min(float(g[-2]) for g in grids)


@torch.no_grad()
def _reference(denoiser: Callable[..., Tensor], x: Tensor, first: float, floor: float, steps: int, cond) -> Tensor:
    """The target of both searches: Heun on a fine Karras grid down to the floor (2 steps - 1 calls)."""
    return get_sampler("heun")(denoiser, x, _karras(first, floor, steps), cond=cond)


@torch.no_grad()
def optimize_sigmas(
    denoiser: Callable[..., Tensor],
    noise: Tensor,
    init: Tensor | Sequence[Tensor],
    sampler: str | Callable[..., Tensor],
    *,
    options: dict | None = None,
    cond: dict | None = None,
    reference: Tensor | None = None,
    reference_steps: int = 256,
    max_sweeps: int = 16,
    min_delta: float = 1 / 64,
    move_start: bool = False,
    log: Callable[[str], None] | None = None,
) -> Tensor:
    """Tune the grid ``init`` (``steps + 1`` noise levels ending in 0, e.g. a Karras grid) for
    ``sampler`` started from ``noise * init[0]`` (``noise`` ~ N(0, I): a small batch of the
    model's sample shape). ``init`` may be a list of such grids (say Karras, log-SNR and quadratic):
    the search starts from the best, as it only finds a local optimum.

    Every positive level but ``init[0]`` moves, the last one (where the sampler jumps to the
    denoiser output) no lower than the smallest last level of ``init``. With ``move_start`` the first
    level moves too, never above ``init[0]``: the sampler then starts from ``noise`` scaled to it (what
    diffusers' "leading" spacing does), while the target stays the solution from ``noise * init[0]``.
    The flow contracts that start's error, and a call saved at the top, where the state is nearly pure
    noise, buys accuracy lower down: on the ``make train`` model at 5 calls DEIS's searched grid
    then starts at sigma 63 instead of 157 and its error on 64 other noises drops from 0.180 to
    0.119.

    ``reference`` is the target to hit; by default Heun on a ``reference_steps`` Karras grid from
    ``init[0]`` down to that smallest last level (2 * reference_steps - 1 calls). The sampler must
    be deterministic (a stochastic one has no single solution to match). ``sampler`` is a registered
    name or a function with the sampler contract (e.g. :func:`fewstep.samplers.learned.fitted_sampler`,
    which fits its weights to every grid it is run on). Returns the grid in float64.
    """
    run = get_sampler(sampler) if isinstance(sampler, str) else sampler
    options = dict(options or {})
    grids, first, floor = _start_grids(init, "optimize")
    x = noise * first
    if reference is None:
        reference = _reference(denoiser, x, first, floor, reference_steps, cond)

    def loss(levels: list[float], seed: int = 0) -> float:
        grid = torch.tensor([*levels, 0.0], dtype=torch.float64)
        # a lowered start: the noise scaled to it, the reference still from init[0]
        start = x if levels[0] == first else noise * levels[0]
        out = run(denoiser, start, grid, generator=torch.Generator(x.device).manual_seed(seed), cond=cond, **options)
        return float((out - reference).double().pow(2).flatten(1).sum(1).mean().sqrt())

    scored = sorted((loss(g[:-1].tolist()), i) for i, g in enumerate(grids))
    best, levels = scored[0][0], grids[scored[0][1]][:-1].tolist()
    if loss(levels, seed=1) != best:
        name = sampler if isinstance(sampler, str) else getattr(sampler, "__name__", "this sampler")
        raise ValueError(f"the optimized spacing needs a deterministic sampler; {name!r} with {options} is not")
    delta, sweep = 0.5, 0
    while sweep < max_sweeps and delta >= min_delta and len(levels) > 1:
        sweep += 1
        improved = False
        for k in range(0 if move_start else 1, len(levels)):
            # a fraction delta of the way (in log sigma) towards the level above or below
            above = levels[k - 1] if k > 0 else first
            for target in (above, levels[k + 1] if k + 1 < len(levels) else floor):
                if target == levels[k]:
                    continue
                trial = [*levels]
                trial[k] = math.exp(math.log(levels[k]) + delta * (math.log(target) - math.log(levels[k])))
                value = loss(trial)
                if value < best:
                    levels, best, improved = trial, value, True
                    break
        if log is not None:
            log(f"optimize_sigmas sweep {sweep}: delta={delta:.4f} error={best:.4g}")
        if not improved:
            delta /= 2
    return torch.tensor([*levels, 0.0], dtype=torch.float64)


def load_or_compute(
    cache_path: str | Path,
    key: dict,
    compute: Callable[[], Any],
    *,
    valid: Callable[[Any], bool] = lambda value: True,
    cost: Mapping[str, float] | None = None,
) -> Any:
    """The JSON value cached under ``key`` in the file ``cache_path``, or ``compute()`` stored there.

    ``key`` should name everything the value depends on (checkpoint, sampler, options, steps, end
    points, ...); it is compared after a JSON round trip, so tuples and lists match. The file is a
    list of ``{"key": ..., "value": ...}`` records, rewritten atomically (temporary file + rename) on
    every addition, so a crash never leaves half a file. An unreadable file, or an entry that
    ``valid`` rejects (stale, edited by hand), is ignored with a warning and recomputed. ``cost``, a
    dict that ``compute`` fills (network evaluations, seconds), is stored beside a new value and
    logged when the value is read back, so a user sees what the cache saved.
    """
    path = Path(cache_path)
    key = json.loads(json.dumps(key, sort_keys=True, default=str))
    records: list = []
    if path.exists():
        try:
            records = json.loads(path.read_text())
            if not isinstance(records, list) or not all(isinstance(r, dict) and "key" in r for r in records):
                raise ValueError("not a list of {key, value} records")
        except (ValueError, OSError) as err:
            warnings.warn(f"ignoring the unreadable cache {path} ({err}); recomputing", stacklevel=2)
            records = []
    for record in records:
        if record["key"] == key:
            value = record.get("value", record.get("sigmas"))  # "sigmas": files of older fewstep versions
            try:
                ok = valid(value)
            except (TypeError, ValueError, LookupError, AttributeError):  # a malformed entry
                ok = False
            if ok:
                if isinstance(record.get("cost"), dict):  # a note only: a malformed one is not logged
                    log.info("read from the cache %s (it cost %s once)", path, _fmt_cost(record["cost"]))
                return value
            warnings.warn(f"ignoring an invalid entry of the cache {path}; recomputing it", stacklevel=2)
            records.remove(record)
            break
    value = compute()
    records.append({"key": key, "value": value, **({"cost": dict(cost)} if cost else {})})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(records, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return value


def _fmt_cost(cost: Mapping[str, float]) -> str:
    return ", ".join(f"{v} {str(k).replace('_', ' ')}" for k, v in cost.items())


def load_or_optimize(
    cache_path: str | Path, key: dict, compute: Callable[[], Tensor], cost: Mapping[str, float] | None = None
) -> Tensor:
    """The grid cached under ``key`` (:func:`load_or_compute`), or ``compute()`` stored there; an
    entry that is no grid (not decreasing, not ending in 0) is recomputed."""

    def valid(value: Any) -> bool:
        grid = torch.tensor(value, dtype=torch.float64)
        return grid.ndim == 1 and len(grid) >= 2 and float(grid[-1]) == 0 and bool((grid[:-1] > grid[1:]).all())

    value = load_or_compute(cache_path, key, lambda: compute().double().cpu().tolist(), valid=valid, cost=cost)
    return torch.tensor(value, dtype=torch.float64)


# ----------------------------------------------------------------------------- LD3

# Samplers whose step rule :func:`_solve_differentiably` repeats with the grid as a tensor.
LD3_SAMPLERS = ("ddim", "dpmpp_2m", "dpmpp_3m")


def _solve_differentiably(
    sampler: str, options: dict, denoiser: Callable[..., Tensor], x: Tensor, sigmas: Tensor, cond: dict | None
) -> Tensor:
    """The step rule of ``ddim`` (eta = 0), ``dpmpp_2m`` or ``dpmpp_3m`` (fewstep.samplers.multistep), the
    same arithmetic, but on a grid that is a tensor, so that autograd reaches the noise levels. A test
    checks that it equals the registered sampler on a fixed grid."""
    from fewstep.samplers.multistep import _step_order

    if sampler == "ddim" and options.get("eta", 0.0) != 0:
        raise ValueError("spacing=ld3 needs a deterministic sampler: sampler.eta=0")
    order = {"ddim": 1, "dpmpp_2m": 2}.get(sampler, int(options.get("order", 3)))
    lower_order_final = bool(options.get("lower_order_final", True))
    steps = len(sigmas) - 1
    denoised_history: list[Tensor] = []
    h_history: list[Tensor] = []
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma.expand(x.shape[0]), **(cond or {}))
        if i == steps - 1:  # the last level of a grid is 0: the step is the denoiser output
            return denoised
        h = torch.log(sigma / sigma_next)
        k = _step_order(i, steps, order, lower_order_final)
        if k == 1 or sampler == "ddim":
            x = (sigma_next / sigma) * x - torch.expm1(-h) * denoised
        elif sampler == "dpmpp_2m":
            r = h_history[-1] / h
            x = (sigma_next / sigma) * x - torch.expm1(-h) * (
                (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * denoised_history[-1]
            )
        else:  # dpmpp_3m, the Taylor form of its docstring
            c0 = -torch.expm1(-h)
            c1 = 1 - c0 / h
            c2 = 1 - 2 * c1 / h
            r0 = h_history[-1] / h
            d1_0 = (denoised - denoised_history[-1]) / r0
            x = (sigma_next / sigma) * x + c0 * denoised
            if k == 2:
                x = x + c1 * d1_0
            else:
                r1 = h_history[-2] / h
                d2 = 2 * (d1_0 - (denoised_history[-1] - denoised_history[-2]) / r1) / (r0 + r1)
                x = x + c1 * (d1_0 + (r0 / 2) * d2) + (c2 / 2) * d2
        denoised_history, h_history = [*denoised_history, denoised][-2:], [*h_history, h][-2:]
    raise AssertionError("unreachable: a grid ends in 0")


def _grid_from_logits(logits: Tensor, log_top: float, log_floor: float) -> Tensor:
    """``steps + 1`` levels from ``exp(log_top)`` down to 0: the gaps in log sigma between the
    ``steps`` positive levels and ``exp(log_floor)`` are the softmax of ``logits`` (``steps`` of them),
    so every grid of logits is strictly decreasing and stays above the floor (LD3's parameterisation)."""
    fractions = torch.cumsum(torch.softmax(logits, 0), 0)[:-1]
    levels = torch.exp(log_top + (log_floor - log_top) * fractions)
    return torch.cat([levels.new_tensor([math.exp(log_top)]), levels, levels.new_zeros(1)])


def ld3_sigmas(
    denoiser: Callable[..., Tensor],
    noise: Tensor,
    init: Tensor | Sequence[Tensor],
    sampler: str,
    *,
    options: dict | None = None,
    cond: dict | None = None,
    reference: Tensor | None = None,
    reference_steps: int = 256,
    iterations: int = 200,
    lr: float = 0.2,
    radius: float = 0.0,
    validation: float = 0.5,
    log: Callable[[str], None] | None = None,
) -> Tensor:
    """LD3 (Tong et al. 2025, "Learning to Discretize Denoising Diffusion ODEs"): gradient descent on
    the noise levels of the grid, through the sampler, towards a fine-step solution of the same ODE.

    Same contract as :func:`optimize_sigmas` (``init``: one or more grids ending in 0, the search
    starts from the one with the lowest error; ``init[0]`` stays fixed; the last positive level stays
    above the lowest one of ``init``). The grid is parameterised by the softmax of ``steps`` logits
    (the gaps in log sigma, :func:`_grid_from_logits`) and trained with Adam, its step size decaying
    from ``lr`` to 0 on a cosine. ``noise`` is split:
    the first ``1 - validation`` part trains, the rest picks the best grid seen (every iteration),
    so the result is judged on noise it was not fitted to.

    Soft teacher forcing (LD3, Sec. 3.2): the training loss lets the student start anywhere in a
    ball of radius ``radius * sqrt(d)`` around its noise (``d`` = dimensions of one sample),
    ``min_{|x' - x| <= r} |Psi_grid(x') - Psi_ref(x)|^2``: a few parameters cannot map every noise
    exactly to its reference, and the slack keeps them from fitting the unreachable part of the
    error. The start offsets are optimised jointly (Adam, projected back onto the ball after each
    step). The paper measures the distance with LPIPS; here it is the squared L2 of the samples,
    which needs no downloaded network. ``radius=0`` is plain global-error descent.

    Cost: ``iterations`` forward and backward passes of the sampler on the training part (about 3x
    the calls of a sampler run each) and as many validation runs, plus the reference
    (``2 * reference_steps - 1`` calls). Returns the grid in float64.
    """
    if sampler not in LD3_SAMPLERS:
        raise ValueError(f"spacing=ld3 supports the samplers {', '.join(LD3_SAMPLERS)}, not {sampler!r}")
    if not 0 < validation < 1 or len(noise) < 2:
        raise ValueError("ld3 needs at least 2 noises and 0 < validation < 1")
    options = dict(options or {})
    grids, first, floor = _start_grids(init, "learn")
    if len(grids[0]) < 3:
        return grids[0]  # one step: nothing to move
    x = noise * first
    if reference is None:
        reference = _reference(denoiser, x, first, floor, reference_steps, cond)
    split = max(1, min(len(noise) - 1, round(len(noise) * (1 - validation))))
    cond_train = {k: v[:split] if isinstance(v, Tensor) else v for k, v in (cond or {}).items()}
    cond_valid = {k: v[split:] if isinstance(v, Tensor) else v for k, v in (cond or {}).items()}
    log_top, log_floor = math.log(first), math.log(floor)  # softmax gaps are > 0: every level stays above

    def error(grid: Tensor, part: slice, part_cond: dict, start: Tensor | None = None) -> Tensor:
        begin = x[part] if start is None else start
        out = _solve_differentiably(sampler, options, denoiser, begin, grid.to(x.dtype), part_cond)
        return (out - reference[part]).pow(2).flatten(1).sum(1)  # per sample

    def logits_of(grid: Tensor) -> Tensor:
        levels = torch.cat([grid[:-1].log(), torch.tensor([log_floor], dtype=torch.float64)])
        # a gap of 0 (the last level on the floor) would be a logit of -inf: a floor of 0.1 % of the range
        return (levels[:-1] - levels[1:]).clamp_min(1e-3 * (log_top - log_floor)).log()

    with torch.no_grad():
        scored = sorted(
            (float(error(g.to(x.device), slice(split, None), cond_valid).mean()), i) for i, g in enumerate(grids)
        )
    best, best_grid = scored[0][0], grids[scored[0][1]]
    logits = logits_of(best_grid).to(x.device).requires_grad_(True)
    offset = torch.zeros_like(x[:split], requires_grad=True)
    bound = radius * math.sqrt(x[0].numel()) * first  # the ball, in units of x = noise * sigma_max
    optimizer = torch.optim.Adam([{"params": [logits], "lr": lr}, {"params": [offset], "lr": lr * first}])
    # cosine decay: large early moves find the basin, small late ones settle (a constant 0.1 oscillated on a U-Net)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations)
    for iteration in range(1, iterations + 1):
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():  # also when called from a sampling loop under no_grad
            grid = _grid_from_logits(logits, log_top, log_floor)
            loss = error(grid, slice(0, split), cond_train, x[:split] + offset)
            loss.mean().backward()
        optimizer.step()
        decay.step()
        with torch.no_grad():
            if radius > 0:  # back onto the ball
                norms = offset.flatten(1).norm(dim=1).clamp_min(1e-12)
                offset.mul_((bound / norms).clamp(max=1.0).view(-1, *[1] * (offset.ndim - 1)))
            else:
                offset.zero_()
            grid = _grid_from_logits(logits, log_top, log_floor).detach().double().cpu()
            value = float(error(grid.to(x.device), slice(split, None), cond_valid).mean())
        if value < best:
            best, best_grid = value, grid
        if log is not None and (iteration % 20 == 0 or iteration == iterations):
            log(f"ld3 iteration {iteration}: train {float(loss.mean()):.4g} validation {value:.4g} best {best:.4g}")
    best_grid[0], best_grid[-1] = first, 0.0
    return best_grid
