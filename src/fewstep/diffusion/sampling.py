"""Run a named sampler from its config: grid, start noise, batches, NFE count.

A sampler config is flat (``conf/sampler/NAME.yaml``): ``name``, ``steps``, ``spacing``, the
spacing's options and ``dynamic_threshold`` are read here, every other key goes to the sampler
function as an option. ``spacing: optimized`` (coordinate descent) and ``spacing: ld3`` (gradient
descent, LD3) tune the grid to the model (see :func:`optimized_sigmas`), ``sampler: learned`` its step
weights (:func:`learned_coefficients`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewstep.config import sampler_config
from fewstep.diffusion.guidance import ClassifierFreeGuidance
from fewstep.diffusion.schedules import Schedule
from fewstep.diffusion.thresholding import DynamicThreshold
from fewstep.samplers import SPACINGS, SampleGenerators, get_sampler
from fewstep.samplers.learned import (
    REFINE_ITERATIONS,
    fit_coefficients,
    fitted_sampler,
    start_candidates,
    start_errors,
)
from fewstep.samplers.optimize import ld3_sigmas, load_or_compute, load_or_optimize, optimize_sigmas

log = logging.getLogger(__name__)
SPACING_OPTIONS = ("rho", "sigma_min", "sigma_max")
OPTIMIZED = "optimized"
LD3 = "ld3"
MODEL_SPACINGS = (OPTIMIZED, LD3)  # grids tuned to a model: they need the denoiser, not only the schedule
# ld3's fit, read from ld3_sigmas' defaults (part of its cache key: a grid fitted otherwise is not reused)
LD3_SETTINGS = {
    k: inspect.signature(ld3_sigmas).parameters[k].default for k in ("iterations", "lr", "radius", "validation")
}
# Grids the optimized spacing starts from (it keeps the best of them as its starting point).
OPTIMIZE_FROM = ("karras", "logsnr", "quadratic", "trailing")
AUTO = "auto"
# sampler=auto: the measured best configuration up to a number of network calls (its steps), by FID of
# the default make train model (model=tiny_fast; 1,000 samples, classifier features, the same noise for every
# row; README, "Which sampler for FID"). From 4 calls SDE-DPM-Solver++(2M) on Karras sigmas from sigma 20
# rather than the schedule's 157: 13.5 / 7.2 / 4.5 / 2.7 / 2.1 / 1.9 at 4 / 5 / 6 / 7 / 8 / 10, against
# 18.0 / 10.7 / 7.6 / 8.0 / 4.7 / 3.6 for the earlier choices (UniPC-2 on the trailing grid up to 6, DPM-Solver++(2M)
# at 7, the SDE from 157 beyond); 1000-step DDPM scores 1.54 on the same noise (seed 1: SDE 2.46, DDPM 2.80;
# eta 1.25 or rho 5, better on seeds 0-1, lost on seeds 2-3). The data are negligible next to
# noise of sigma 20, and the Karras grid from 157 spends four of its ten levels above 20; the probability-flow
# ODE does not gain from it (5.5 against 4.7 at 10), the SDE, whose fresh noise corrects what the network
# gets wrong, does. At 3 calls UniPC-2 on the trailing grid stays (51 against 61). The last entry covers the
# rest. Name an ODE sampler for a deterministic noise-to-image map.
AUTO_CHOICES: tuple[tuple[int, dict], ...] = (
    (3, {"name": "unipc", "spacing": "trailing", "order": 2}),
    (10**9, {"name": "dpmpp_2m_sde", "spacing": "karras", "sigma_max": 20.0}),
)
# sampler=auto sampler.objective=ode: the closest to the probability-flow ODE's own map from noise to image (a
# deterministic sampler, for inversion, editing and interpolation, or a distillation teacher). Measured best on
# both trained networks of the side-by-side benchmark at 5 and 10 calls (docs/samplers.md, "fewstep vs
# diffusers"): learned refined from UniPC's or DPM-Solver++(3M)'s weights on that sampler's searched grid, the
# start chosen on held-out noise; grids, weights and choice are fitted once per checkpoint and cached.
AUTO_ODE_CHOICE = {"name": "learned", "spacing": OPTIMIZED, "form": "data", "start_from": ("unipc", "dpmpp_3m")}
AUTO_OBJECTIVES = ("fid", "ode")


def auto_config(steps: int, objective: str = "fid") -> dict:
    """The sampler config ``sampler=auto`` stands for at ``steps`` network calls: the best by FID, or
    with ``objective="ode"`` the closest to the ODE solution."""
    if objective not in AUTO_OBJECTIVES:
        raise ValueError(f"sampler.objective must be one of {', '.join(AUTO_OBJECTIVES)}, got {objective!r}")
    fid = next(choice for limit, choice in AUTO_CHOICES if steps <= limit)
    config = AUTO_ODE_CHOICE if objective == "ode" else fid
    return {**sampler_config(config["name"]), **config, "steps": steps}


@dataclass
class SamplerSpec:
    name: str = "ddim"
    steps: int = 50
    spacing: str = "trailing"
    spacing_options: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    dynamic_threshold: float | None = None

    @classmethod
    def from_config(cls, config: Mapping | None, **overrides) -> SamplerSpec:
        """Split a flat sampler config into the grid's and the sampler's options."""
        merged = {**dict(config or {}), **{k: v for k, v in overrides.items() if v is not None}}
        steps = merged.pop("steps", 10 if merged.get("name") == AUTO else 50)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"sampler.steps must be an integer >= 1, got {steps!r}")
        if merged.get("name") == AUTO:  # the measured best for the steps; any other key still overrides it
            objective = merged.pop("objective", "fid")
            best = {k: v for k, v in auto_config(steps, objective).items() if k != "steps"}
            merged = {**best, **{k: v for k, v in merged.items() if k != "name"}}
            log.info("sampler=auto at %s steps: %s", steps, merged)
        name = merged.pop("name", "ddim")
        sampler = get_sampler(name)  # fail early, with the list of valid names
        spacing = merged.pop("spacing", "trailing")
        if spacing not in SPACINGS and spacing not in MODEL_SPACINGS:
            valid = ", ".join([*sorted(SPACINGS), *MODEL_SPACINGS])
            raise ValueError(f"unknown sampler.spacing={spacing!r}; choose one of: {valid}")
        spacing_options = {k: merged.pop(k) for k in SPACING_OPTIONS if k in merged and merged[k] is not None}
        for key in SPACING_OPTIONS:
            merged.pop(key, None)
        threshold = merged.pop("dynamic_threshold", None)
        accepted = sampler_options(sampler)
        unknown = sorted(set(merged) - set(accepted))
        if unknown:
            raise ValueError(
                f"sampler {name!r} has no option {', '.join(unknown)}; its options are: "
                f"{', '.join(['steps', 'spacing', *SPACING_OPTIONS, 'dynamic_threshold', *accepted])}"
            )
        return cls(name, steps, spacing, spacing_options, merged, threshold)

    def sigmas(self, schedule: Schedule) -> Tensor:
        """The grid of a fixed spacing (optimized and ld3 need a model: :func:`optimized_sigmas`)."""
        if self.spacing in MODEL_SPACINGS:
            raise ValueError(f"spacing={self.spacing} depends on the model; sample through DiffusionModel.sample")
        return schedule.sigmas(self.steps, self.spacing, dtype=torch.float64, **self.spacing_options)

    def wrap(self, denoiser: Callable[..., Tensor]) -> Callable[..., Tensor]:
        """The denoiser with this config's dynamic thresholding (Imagen), if any."""
        return DynamicThreshold(denoiser, self.dynamic_threshold) if self.dynamic_threshold else denoiser


def sampler_options(sampler: Callable[..., Tensor]) -> list[str]:
    """The keyword options a sampler function takes beyond the contract's own arguments."""
    contract = {"denoiser", "x", "sigmas", "generator", "callback", "cond"}
    return [p for p in inspect.signature(sampler).parameters if p not in contract]


def search_top(schedule: Schedule, spec: SamplerSpec) -> float:
    """The level a model spacing's search scores against, the first of the grids it starts from: a
    searched grid may start below it, and ``learned``'s weights still aim at the solution from it."""
    return float(schedule.sigmas(spec.steps, OPTIMIZE_FROM[0], dtype=torch.float64, **spec.spacing_options)[0])


def optimized_sigmas(
    denoiser: Callable[..., Tensor],
    schedule: Schedule,
    spec: SamplerSpec,
    shape: tuple[int, ...],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    cache_path: str | Path | None = None,
    cache_key: Mapping | None = None,
) -> Tensor:
    """The grid of a model spacing: the one minimising this sampler's error to a fine-step ODE
    solution for this model, from the best of the Karras, log-SNR, quadratic and trailing grids on a fixed
    batch of ``batch_size`` noises. ``spacing=optimized``: coordinate descent on the levels (in the
    spirit of Align Your Steps, Sabour et al. 2024; :func:`optimize_sigmas`), any deterministic
    sampler; its first level moves too (``move_start``: the sampler starts from the noise scaled to
    it, as diffusers' "leading" spacing does, scored against the solution from the schedule's top:
    at 5-10 calls a call spent at the top, where the state is nearly pure noise, can buy more
    accuracy lower down). ``spacing=ld3``: gradient descent through the sampler (LD3, Tong et al. 2025;
    :func:`ld3_sigmas`), half the batch to fit, half to pick the best grid; ``ddim``, ``dpmpp_2m``
    and ``dpmpp_3m``. For ``sampler=learned`` (no weights given) the coordinate descent fits the
    weights to every grid it tries (:func:`fewstep.samplers.learned.fitted_sampler`): the grid is
    searched for the fitted sampler the user will run, at a fit's cost per trial.

    Either costs hundreds to thousands of network calls (the learned search tens of thousands), so
    with ``cache_path`` the grid is stored in that JSON file under ``cache_key`` (which must identify
    the weights) plus the sampler, its options, the steps and the shape, and computed once.
    """
    if spec.spacing not in MODEL_SPACINGS:
        raise ValueError(f"spacing={spec.spacing} is not tuned to a model; use SamplerSpec.sigmas")
    fixed = spec.options.get("start_from") if spec.name == "learned" else None
    if fixed is not None and not isinstance(fixed, str):
        if len(start_candidates(fixed)) != 1:  # DiffusionModel.sample resolves a list first (learned_start)
            raise ValueError(f"start_from={list(fixed)}: each start has its own grid; search one at a time")
        fixed = start_candidates(fixed)[0]
    if fixed is not None:  # learned from a fixed sampler's weights: on the grid searched for that sampler
        options = SamplerSpec.from_config(sampler_config(fixed)).options  # its defaults, as sampler=NAME has them
        fixed_spec = SamplerSpec(fixed, spec.steps, spec.spacing, spec.spacing_options, options, spec.dynamic_threshold)
        return optimized_sigmas(
            denoiser,
            schedule,
            fixed_spec,
            shape,
            device=device,
            batch_size=batch_size,
            cache_path=cache_path,
            cache_key=cache_key,
        )
    starts = [schedule.sigmas(spec.steps, s, dtype=torch.float64, **spec.spacing_options) for s in OPTIMIZE_FROM]
    counter, cost = CountingDenoiser(spec.wrap(denoiser), batch=1), {}
    # learned without given weights: search the grid for the weights fitted to it, not for the fixed rule
    fitted = spec.name == "learned" and spec.options.get("coefficients") is None

    def compute() -> Tensor:
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn((batch_size, *shape), generator=generator).to(device)
        with costed(counter, cost, f"{spec.spacing} grid for {spec.name} at {spec.steps} steps"):
            if spec.spacing == LD3:
                return ld3_sigmas(counter, noise, starts, spec.name, options=spec.options, log=log.info)
            if fitted:
                form, history = str(spec.options.get("form", "eps")), int(spec.options.get("history", 3))
                top, end = search_top(schedule, spec), schedule.sigma_min  # where the search's reference runs
                sampler = fitted_sampler(form=form, history=history, start_sigma=top, end_sigma=end)
                return optimize_sigmas(counter, noise, starts, sampler, move_start=True)
            return optimize_sigmas(counter, noise, starts, spec.name, options=spec.options, move_start=True)

    if cache_path is None:
        return compute()
    key = {
        **dict(cache_key or {}),
        "sampler": spec.name,
        "options": spec.options,
        "dynamic_threshold": spec.dynamic_threshold,
        "steps": spec.steps,
        "spacing_options": spec.spacing_options,
        "shape": list(shape),
        "batch_size": batch_size,
        **({"spacing": LD3, "ld3": LD3_SETTINGS} if spec.spacing == LD3 else {"start": "searched"}),
        # not the fixed rule's grid, and weights fitted to the solution from the top (not from a lowered
        # start) down to the ODE's end (not the denoised last level)
        **({"searched_for": "weights fitted from the top to the end"} if fitted and spec.spacing != LD3 else {}),
    }
    return load_or_optimize(cache_path, key, compute, cost=cost)


def learned_coefficients(
    denoiser: Callable[..., Tensor],
    spec: SamplerSpec,
    sigmas: Tensor,
    shape: tuple[int, ...],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    cond: Mapping | None = None,
    start_sigma: float | None = None,
    end_sigma: float | None = None,
    cache_path: str | Path | None = None,
    cache_key: Mapping | None = None,
) -> list[list[float]]:
    """``sampler=learned``'s weights for this model and grid (:func:`fewstep.samplers.learned.fit_coefficients`,
    the sequential fit refined jointly, on a fixed batch of ``batch_size`` noises), stored in the JSON
    file ``cache_path`` under ``cache_key`` (which must identify the weights) plus the grid and
    options: computed once. ``start_sigma``: the level the solution to match starts from, for a
    searched grid whose first level moved below the top (:func:`optimized_sigmas`); ``end_sigma``: the
    level that solution descends to before its final denoising (the schedule's smallest), for a grid
    whose last positive level is higher."""
    history, form = int(spec.options.get("history", 3)), str(spec.options.get("form", "eps"))
    start_from = spec.options.get("start_from")
    steps = len(sigmas) - 1

    counter, cost = CountingDenoiser(spec.wrap(denoiser), batch=1), {}

    def compute() -> list[list[float]]:
        noise = torch.randn((batch_size, *shape), generator=torch.Generator().manual_seed(0)).to(device)
        batch_cond = {k: v[:batch_size] for k, v in (cond or {}).items()}
        with costed(counter, cost, f"learned weights for {steps} steps"):
            return fit_coefficients(
                counter,
                noise,
                sigmas,
                form=form,
                history=history,
                cond=batch_cond,
                start_sigma=start_sigma,
                end_sigma=end_sigma,
                start_from=start_from,
            )

    if cache_path is None:
        return compute()

    def valid(value: Any) -> bool:
        return len(value) == steps and all(len(w) == history and all(math.isfinite(v) for v in w) for w in value)

    key = {
        **dict(cache_key or {}),
        "kind": "learned_coefficients",
        "sigmas": [float(v) for v in sigmas.tolist()],
        **({"start_sigma": float(start_sigma)} if start_sigma is not None else {}),
        **({"end_sigma": float(end_sigma)} if end_sigma is not None else {}),
        "history": history,
        "form": form,
        **({"start_from": start_from} if start_from is not None else {}),
        "refine": REFINE_ITERATIONS,  # weights fitted before the joint refinement are not reused
        "dynamic_threshold": spec.dynamic_threshold,
        "shape": list(shape),
        "batch_size": batch_size,
    }
    return load_or_compute(cache_path, key, compute, valid=valid, cost=cost)


def learned_start(
    denoiser: Callable[..., Tensor],
    spec: SamplerSpec,
    candidates: Mapping[str, tuple[Tensor, list[list[float]]]],
    shape: tuple[int, ...],
    *,
    start_sigma: float,
    end_sigma: float,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    cond: Mapping | None = None,
    cache_path: str | Path | None = None,
    cache_key: Mapping | None = None,
) -> str:
    """``sampler=learned`` with ``start_from=[a, b, ...]``: of the samplers fitted from each (``candidates``:
    name -> its grid and weights), the one closest to the ODE solution from ``start_sigma`` on
    ``batch_size`` noises of another seed than the grid search's and the fit's
    (:func:`fewstep.samplers.learned.start_errors`). Which start wins depends on the network and the
    budget, so the library measures it instead of asking the user to know. Stored in the JSON file
    ``cache_path`` under ``cache_key`` plus the candidates' grids and weights, with the errors: computed once."""
    form, history = str(spec.options.get("form", "data")), int(spec.options.get("history", 3))
    counter, cost = CountingDenoiser(spec.wrap(denoiser), batch=1), {}

    def compute() -> dict:
        noise = torch.randn((batch_size, *shape), generator=torch.Generator().manual_seed(1)).to(device)
        batch_cond = {k: v[:batch_size] for k, v in (cond or {}).items()}
        with costed(counter, cost, f"the start of learned among {', '.join(candidates)}"):
            errors = start_errors(
                counter,
                noise,
                candidates,
                start_sigma=start_sigma,
                end_sigma=end_sigma,
                form=form,
                history=history,
                cond=batch_cond,
            )
        return {"choice": min(errors, key=errors.get), "errors": errors}

    def valid_choice(value: Any) -> bool:  # as compute() writes it: a hand-edited entry is recomputed
        errors = value["errors"]
        numbers = all(isinstance(e, int | float) and math.isfinite(e) for e in errors.values())
        return value["choice"] in candidates and set(errors) == set(candidates) and numbers

    if cache_path is None:
        result = compute()
    else:
        key = {
            **dict(cache_key or {}),
            "kind": "learned_start",
            "candidates": {name: {"sigmas": g.tolist(), "coefficients": w} for name, (g, w) in candidates.items()},
            "start_sigma": float(start_sigma),
            "end_sigma": float(end_sigma),
            "form": form,
            "history": history,
            "dynamic_threshold": spec.dynamic_threshold,
            "shape": list(shape),
            "batch_size": batch_size,
        }
        result = load_or_compute(cache_path, key, compute, valid=valid_choice, cost=cost)
    errors = ", ".join(f"{name} {error:.4g}" for name, error in result["errors"].items())
    log.info("learned at %d steps starts from %s (held-out RMS error: %s)", spec.steps, result["choice"], errors)
    return result["choice"]


@contextlib.contextmanager
def costed(counter: CountingDenoiser, cost: dict, what: str) -> Iterator[None]:
    """Fill ``cost`` with the network evaluations (images through the network, ``counter``'s calls
    with ``batch=1``) and the seconds of the block, and log them: what a learned grid or weight set
    costs once, before the cache makes it free."""
    counter.calls, start = 0, time.perf_counter()
    yield
    cost.update(network_evaluations=counter.calls, seconds=round(time.perf_counter() - start, 2))
    log.info("%s: %d network evaluations (images), %.1f s", what, cost["network_evaluations"], cost["seconds"])


class CountingDenoiser:
    """Counts network evaluations per sample: one per call on the sampled batch, two for a call on a
    doubled batch (classifier-free guidance's batched conditional + unconditional halves)."""

    def __init__(self, denoiser: Callable[..., Tensor], batch: int | None = None) -> None:
        self.denoiser, self.batch, self.rows = denoiser, batch, 0

    @property
    def calls(self) -> int | float:
        if not self.batch:
            return self.rows
        calls = self.rows / self.batch  # a whole number unless guidance covered only part of a batch
        return int(calls) if calls.is_integer() else calls

    @calls.setter
    def calls(self, value: int) -> None:  # reset: ``counter.calls = 0``
        self.rows = value

    def __call__(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        self.rows += x.shape[0] if self.batch else 1
        return self.denoiser(x, sigma, **cond)


@dataclass
class Guidance:
    """Classifier-free guidance settings (``conf/guidance``): ``scale`` w, the null condition and the
    guidance interval. ``scale = 1`` (the ``none`` option) samples the conditional model as it is."""

    scale: float = 1.0
    uncond: Mapping | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None

    def wrap(self, denoiser: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if self.scale == 1:
            return denoiser
        if not self.uncond:
            raise ValueError("classifier-free guidance needs the model's null condition (train with a condition)")
        return ClassifierFreeGuidance(denoiser, self.scale, self.uncond, self.sigma_min, self.sigma_max)


@dataclass
class SampleResult:
    images: Tensor
    nfe: float
    seconds: float
    indices: range = field(default_factory=lambda: range(0))
    spec: SamplerSpec | None = None  # the sampler that ran (what sampler=auto stood for)

    @property
    def images_per_second(self) -> float:
        return len(self.images) / self.seconds if self.seconds > 0 else math.inf


def sample_seeds(seed: int, indices: Sequence[int] | range) -> list[int]:
    """The seed of each sample: a function of (``seed``, the sample's index) only (numpy's SeedSequence)."""
    return [int(np.random.SeedSequence([int(seed), int(i)]).generate_state(1, np.uint64)[0] >> 1) for i in indices]


# Sampling batches for batch_size=auto. On a CPU per-image time grows with the batch once the
# activations outgrow the caches: the tiny U-Net at 32x32 ran 1.7x faster per image at 64 than at 256
# (benchmarks/throughput.py --batch-sizes); a GPU needs large batches to be busy.
CPU_SAMPLE_BATCH = 64
GPU_SAMPLE_BATCH = 256


def resolve_batch_size(batch_size: int | str | None, device: torch.device | str) -> int:
    """``auto`` (or None): :data:`CPU_SAMPLE_BATCH` on a CPU, :data:`GPU_SAMPLE_BATCH` elsewhere; else an int >= 1."""
    if batch_size is None or batch_size == "auto":
        return CPU_SAMPLE_BATCH if torch.device(device).type == "cpu" else GPU_SAMPLE_BATCH
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1 or auto, got {batch_size!r}")
    return batch_size


def iter_generate(
    denoiser: Callable[..., Tensor],
    schedule: Schedule,
    spec: SamplerSpec,
    shape: tuple[int, ...],
    num_samples: int,
    *,
    batch_size: int | str | None = "auto",
    seed: int = 0,
    first_index: int = 0,
    device: torch.device | str = "cpu",
    cond: Mapping | None = None,
    guidance: Guidance | None = None,
    sigmas: Tensor | None = None,
    to_cpu: bool = True,
) -> Iterator[SampleResult]:
    """The one sampling loop (``sample.py``, the callbacks and ``DiffusionModel.sample`` use it).

    Yields the samples ``first_index .. first_index + num_samples - 1`` in batches of at most
    ``batch_size`` (``auto``: :func:`resolve_batch_size` for ``device``). Sample i starts from, and
    draws all its noise from, a generator seeded by (``seed``, i): the same seed gives the same image
    whatever the batch size or the number of DDP ranks that share the indices (EDM's per-sample
    generators).

    ``cond`` values with a leading dimension of ``num_samples`` are split with the batches, others
    are passed as they are. ``nfe`` is the network evaluations one sample needed (CFG's batched
    halves count twice); ``seconds`` the wall time of the batch. ``sigmas`` overrides the grid.
    """
    if num_samples < 1:
        raise ValueError(f"number of samples must be >= 1, got {num_samples}")
    batch_size = resolve_batch_size(batch_size, device)
    sampler = get_sampler(spec.name)
    sigmas = spec.sigmas(schedule) if sigmas is None else sigmas
    device = torch.device(device)
    with torch.no_grad():
        for begin in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - begin)
            indices = range(first_index + begin, first_index + begin + n)
            start = time.perf_counter()
            generators = SampleGenerators(sample_seeds(seed, indices), device)
            x = generators.randn((n, *shape)) * sigmas[0].item()
            batch_cond = {k: _rows(v, begin, n, num_samples) for k, v in (cond or {}).items()}
            counter = CountingDenoiser(denoiser, batch=n)
            guided = (guidance or Guidance()).wrap(counter)
            out = sampler(spec.wrap(guided), x, sigmas, generator=generators, cond=batch_cond, **spec.options)
            out = out.cpu() if to_cpu else out
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            yield SampleResult(out, counter.calls, time.perf_counter() - start, indices, spec)


def generate(*args, progress: Callable[[int], None] | None = None, **kwargs) -> SampleResult:
    """All of :func:`iter_generate`'s batches as one result (same arguments)."""
    return collect(iter_generate(*args, **kwargs), progress)


def collect(batches: Iterable[SampleResult], progress: Callable[[int], None] | None = None) -> SampleResult:
    """Batches of samples as one result: images concatenated, the largest NFE, the summed time."""
    chunks, nfe, seconds, indices, spec = [], 0.0, 0.0, [], None
    for result in batches:
        chunks.append(result.images)
        spec = result.spec
        nfe, seconds = max(nfe, result.nfe), seconds + result.seconds
        indices.extend(result.indices)
        if progress is not None:
            progress(len(result.images))
    span = range(indices[0], indices[-1] + 1) if indices else range(0)
    return SampleResult(torch.cat(chunks), nfe, seconds, span, spec)


def _rows(value: object, begin: int, n: int, total: int) -> object:
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == total:
        return value[begin : begin + n]
    return value
