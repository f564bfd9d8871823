"""The ``optimized`` spacing: a sampling grid tuned to one model and one sampler.

In the spirit of Align Your Steps (Sabour et al. 2024), which moves the few grid points of a
sampler to where they help a given model most. AYS minimises a KL upper bound by stochastic
search; here the objective is direct and deterministic: the RMS distance between the sampler's
result on the grid and a fine-step reference solution of the same PF-ODE (same starting noise,
a small batch), minimised by coordinate descent on ``log sigma`` of every level but the first.

Each trial moves one level a fraction ``delta`` of the way towards a neighbour, so the grid stays
strictly decreasing without constraints; ``delta`` halves after a sweep without gain. Searching
is costly (up to ``2 (steps - 1)`` sampler runs per sweep), so results are meant to be cached per
checkpoint with :func:`load_or_optimize`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.samplers.registry import check_sigmas, get_sampler


def _karras(sigma_max: float, sigma_min: float, steps: int, rho: float = 7.0) -> Tensor:
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@torch.no_grad()
def optimize_sigmas(
    denoiser: Callable[..., Tensor],
    noise: Tensor,
    init: Tensor | Sequence[Tensor],
    sampler: str,
    *,
    options: dict | None = None,
    cond: dict | None = None,
    reference: Tensor | None = None,
    reference_steps: int = 256,
    max_sweeps: int = 16,
    min_delta: float = 1 / 64,
    log: Callable[[str], None] | None = None,
) -> Tensor:
    """Tune the grid ``init`` (``steps + 1`` noise levels ending in 0, e.g. a Karras grid) for
    ``sampler`` started from ``noise * init[0]`` (``noise`` ~ N(0, I): a small batch of the
    model's sample shape). ``init`` may be a list of such grids (say Karras, log-SNR and quadratic):
    the search starts from the best, as it only finds a local optimum.

    ``init[0]`` stays fixed; every other positive level moves, the last one (where the sampler
    jumps to the denoiser output) no lower than the smallest last level of ``init``. ``reference``
    is the target to hit; by default Heun on a ``reference_steps`` Karras grid down to that level
    (2 * reference_steps - 1 calls). The sampler must be deterministic (a stochastic one has no
    single solution to match). Returns the grid in float64.
    """
    run = get_sampler(sampler)
    options = dict(options or {})
    probe = torch.empty(0, dtype=torch.float64)
    grids = [check_sigmas(g.double().cpu().clone(), probe) for g in ([init] if isinstance(init, Tensor) else init)]
    first = float(grids[0][0]) if grids else 0.0
    if not grids or any(float(g[-1]) != 0 or len(g) != len(grids[0]) or abs(g[0] / first - 1) > 1e-9 for g in grids):
        raise ValueError("the grids to optimize must end in 0 and share their length and first level")
    for g in grids:
        g[0] = first  # the same start for all, exactly
    x = noise * first
    floor = min(float(g[-2]) for g in grids)
    if reference is None:
        grid = _karras(first, floor, reference_steps)
        reference = get_sampler("heun")(denoiser, x, grid, cond=cond)

    def loss(levels: list[float], seed: int = 0) -> float:
        grid = torch.tensor([*levels, 0.0], dtype=torch.float64)
        out = run(denoiser, x, grid, generator=torch.Generator(x.device).manual_seed(seed), cond=cond, **options)
        return float((out - reference).double().pow(2).flatten(1).sum(1).mean().sqrt())

    scored = sorted((loss(g[:-1].tolist()), i) for i, g in enumerate(grids))
    best, levels = scored[0][0], grids[scored[0][1]][:-1].tolist()
    if loss(levels, seed=1) != best:
        raise ValueError(f"the optimized spacing needs a deterministic sampler; {sampler!r} with {options} is not")
    delta, sweep = 0.5, 0
    while sweep < max_sweeps and delta >= min_delta and len(levels) > 1:
        sweep += 1
        improved = False
        for k in range(1, len(levels)):
            # a fraction delta of the way (in log sigma) towards the level above or below
            for target in (levels[k - 1], levels[k + 1] if k + 1 < len(levels) else floor):
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
) -> Any:
    """The JSON value cached under ``key`` in the file ``cache_path``, or ``compute()`` stored there.

    ``key`` should name everything the value depends on (checkpoint, sampler, options, steps, end
    points, ...); it is compared after a JSON round trip, so tuples and lists match. The file is a
    list of ``{"key": ..., "value": ...}`` records, rewritten atomically (temporary file + rename) on
    every addition, so a crash never leaves half a file. An unreadable file, or an entry that
    ``valid`` rejects (stale, edited by hand), is ignored with a warning and recomputed.
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
            except (TypeError, ValueError, IndexError):
                ok = False
            if ok:
                return value
            warnings.warn(f"ignoring an invalid entry of the cache {path}; recomputing it", stacklevel=2)
            records.remove(record)
            break
    value = compute()
    records.append({"key": key, "value": value})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(records, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return value


def load_or_optimize(cache_path: str | Path, key: dict, compute: Callable[[], Tensor]) -> Tensor:
    """The grid cached under ``key`` (:func:`load_or_compute`), or ``compute()`` stored there; an
    entry that is no grid (not decreasing, not ending in 0) is recomputed."""

    def valid(value: Any) -> bool:
        grid = torch.tensor(value, dtype=torch.float64)
        return grid.ndim == 1 and len(grid) >= 2 and float(grid[-1]) == 0 and bool((grid[:-1] > grid[1:]).all())

    value = load_or_compute(cache_path, key, lambda: compute().double().cpu().tolist(), valid=valid)
    return torch.tensor(value, dtype=torch.float64)
