"""fewstep's samplers against diffusers' schedulers: the same network, the same noise, the same ODE.

    pip install diffusers                                  # benchmark-only; fewstep never imports it
    python benchmarks/vs_diffusers.py                      # the exact Gaussian mixture (784-d), ~5 min
    python benchmarks/vs_diffusers.py --ckpt A.ckpt --ckpt B.ckpt          # + trained networks, 256 images
    python benchmarks/vs_diffusers.py --quick              # smoke run (64-d mixture, 2 budgets)

Every diffusers scheduler gets the *same* function of (x_t, t) that fewstep's samplers get, as an
eps-prediction model: ``eps(x_vp, t) = (x - D(x, sigma)) / sigma`` with ``sigma = sigma(t)`` (log-linear
in t between training steps, the rule both libraries use for fractional timesteps) and
``x = x_vp sqrt(1 + sigma^2)``, and the training betas themselves (``trained_betas``), so both solve the
one probability-flow ODE of D. Every run starts from the same noise, ``x = noise * sigma_max`` at the
noisiest training level (a VP scheduler gets ``x / sqrt(1 + sigma_max^2)``; diffusers' "leading" grids
and fewstep's optimized ones may start lower, from that noise scaled to their first level), and every
network call is counted (PNDM/PLMS spends one more than its steps; Heun two per step but the last).

Error: RMS over all pixels (data units) of the distance to a converged solution of the same ODE:
for the mixture, scipy's DOP853 at rtol 1e-11 (its distance to the rtol 1e-8 solution is printed);
for a network (float32), DPM-Solver++(3M) on 400 log-SNR steps (its distance to the 200-step
solution is printed: third order, so the 400-step one is ~8x closer still). A scheduler ending at
the smallest training level instead of 0 (DEIS) is measured as it is: that is the image a user gets.
The RMS error of the median image is recorded and compared too: on a network a few images far off carry
much of the RMS. For the same reason each best-against-best ratio comes with a 5-95 % bootstrap interval
over the scored images (paired draws; it holds the chosen configurations and fewstep's fitted grids and
weights fixed). With so heavy a tail, 64 images can miss the far-off ones: score 256 (``--n 256``).

diffusers' configurations: every documented ``timestep_spacing`` (leading, linspace, trailing) and
``use_karras_sigmas`` where offered; each scheduler's best is reported per budget (an oracle choice
in its favour). fewstep: each sampler with its packaged defaults and the spacing variants listed in
``FEWSTEP``, and ``sampler=learned`` (step weights fitted to the model, ``--learned`` grids; ``optimized``
also searches the grid, refitting the weights to every grid it tries; ``--learned-from unipc``: data form,
refined from UniPC's own weights on UniPC's searched grid) fitted on *another* batch of noise than the one
scored. With two or more ``--learned-from`` samplers a row "learned from the best of ..." takes, at each
budget, the one a third batch of noise (32, seed 2) ranks first, as ``sampler.start_from=[unipc,dpmpp_3m]``
does in the library. Results go to a JSON file, the per-image errors to a second one (kept out of git under
``assets/``), and a plot (``--out``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the Gaussian mixture and its exact ODE solution

from gmm import GaussianMixture, ode_reference  # noqa: E402

from fewstep.config import sampler_config  # noqa: E402
from fewstep.diffusion.sampling import OPTIMIZE_FROM, CountingDenoiser  # noqa: E402
from fewstep.diffusion.schedules import LinearSchedule, Schedule  # noqa: E402
from fewstep.samplers import SAMPLERS  # noqa: E402
from fewstep.samplers.learned import fit_coefficients, fitted_sampler, start_errors  # noqa: E402
from fewstep.samplers.optimize import ld3_sigmas, optimize_sigmas  # noqa: E402
from fewstep.samplers.spacing import t_to_sigma  # noqa: E402

NFES = (4, 5, 6, 8, 10, 15, 20)
REFERENCE_STEPS = 400  # DPM-Solver++(3M) log-SNR steps of a network case's reference (checked against half as many)
GRID_KEYS = ("name", "steps", "spacing", "rho", "sigma_min", "sigma_max")

# diffusers: (label, class name, constructor options, calls(steps), steps(nfe))
ONE_PER_STEP = (lambda s: s, lambda n: n)
DIFFUSERS = [
    ("DDIM", "DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True}, *ONE_PER_STEP),
    ("Euler", "EulerDiscreteScheduler", {}, *ONE_PER_STEP),
    ("Heun", "HeunDiscreteScheduler", {}, lambda s: 2 * s - 1, lambda n: (n + 1) // 2),
    (
        "DPM-Solver++ 2M",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        *ONE_PER_STEP,
    ),
    (
        "DPM-Solver++ 3M",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 3},
        *ONE_PER_STEP,
    ),
    ("UniPC 2", "UniPCMultistepScheduler", {"solver_order": 2}, *ONE_PER_STEP),
    ("UniPC 3", "UniPCMultistepScheduler", {"solver_order": 3}, *ONE_PER_STEP),
    ("DEIS 2", "DEISMultistepScheduler", {"solver_order": 2}, *ONE_PER_STEP),
    ("DEIS 3", "DEISMultistepScheduler", {"solver_order": 3}, *ONE_PER_STEP),
    (
        "PNDM (PLMS)",
        "PNDMScheduler",
        {"skip_prk_steps": True, "set_alpha_to_one": True},
        lambda s: s + 1,
        lambda n: n - 1,
    ),
    ("LMS", "LMSDiscreteScheduler", {}, *ONE_PER_STEP),
]
KARRAS_CAPABLE = {"EulerDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
                  "UniPCMultistepScheduler", "DEISMultistepScheduler", "LMSDiscreteScheduler"}  # fmt: skip

# fewstep: (sampler, overrides of its packaged config)
FEWSTEP = [
    ("ddim", {}),
    ("euler", {}),
    ("heun", {}),
    ("dpmpp_2m", {}),
    ("dpmpp_2m", {"spacing": "logsnr"}),
    ("dpmpp_3m", {}),
    ("dpmpp_3m", {"spacing": "logsnr"}),
    ("unipc", {}),
    ("unipc", {"spacing": "logsnr"}),
    ("unipc", {"order": 3}),
    ("unipc", {"order": 3, "spacing": "logsnr"}),
    ("ipndm", {}),
    ("ipndm", {"spacing": "logsnr"}),
    ("ipndm", {"spacing": "trailing"}),
    ("deis", {}),
    ("deis", {"spacing": "logsnr"}),
    ("deis", {"order": 4}),
    ("deis", {"order": 4, "spacing": "logsnr"}),
]


class EpsModel:
    """The denoiser as the eps-prediction model diffusers' schedulers call: ``model(x_vp, t) -> eps``."""

    def __init__(self, denoiser: Callable[..., Tensor], schedule: Schedule) -> None:
        self.denoiser, self.train_sigmas, self.calls = denoiser, schedule.train_sigmas, 0

    def __call__(self, x_vp: Tensor, t: Tensor | float) -> Tensor:
        self.calls += 1
        t = torch.as_tensor(t, dtype=torch.float64).reshape(1)
        sigma = float(t_to_sigma(self.train_sigmas, t))
        x = x_vp * math.sqrt(1 + sigma**2)
        sig = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
        return (x - self.denoiser(x, sig)) / sigma


def run_diffusers(cls_name: str, options: dict, steps: int, model: EpsModel, start: Tensor, sigma_max: float) -> Tensor:
    """One diffusers sampling loop (the pipelines' loop: scale_model_input, model, step) from ``start``
    (= noise * sigma_max in fewstep's VE scale); returns x0 in the same scale as fewstep's output."""
    import diffusers

    scheduler = getattr(diffusers, cls_name)(**options)
    scheduler.set_timesteps(steps)
    # Euler-type schedulers (init_noise_sigma > 1) carry x in the VE scale; the others carry x_vp.
    ve = float(scheduler.init_noise_sigma) > 1.0
    x = start.clone() if ve else start / math.sqrt(1 + sigma_max**2)
    for t in scheduler.timesteps:
        eps = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x).prev_sample
    return x


def rms(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def per_image_squared(x: Tensor, reference: Tensor) -> Tensor:
    """Every image's mean squared error (its RMS error squared)."""
    return (x.double() - reference.double()).pow(2).flatten(1).mean(1)


def median_image_error(x: Tensor, reference: Tensor) -> float:
    """The RMS error of the median image."""
    return float(per_image_squared(x, reference).median().sqrt())


def record(results: dict, lib: str, label: str, nfe: int, calls: int, x: Tensor, reference: Tensor) -> float:
    """Store ``(calls, RMS error)`` under ``results[lib][label][nfe]`` and the median image's RMS error
    under ``results["median_image"]``: on a network a few trajectories that end near another mode carry
    much of the squared error (UniPC at 10 NFE on the ``make train`` model: 5 of 64 images, 56 % of it),
    so the RMS alone can rank samplers by those few."""
    err = rms(x, reference)
    squared = per_image_squared(x, reference)  # for the intervals
    median = median_image_error(x, reference)
    finite = math.isfinite(err)
    results[lib].setdefault(label, {})[nfe] = (calls, err if finite else None)
    results.setdefault("median_image", {}).setdefault(lib, {}).setdefault(label, {})[nfe] = (
        calls,
        median if finite else None,
    )
    if finite:  # 4 digits: the file stays small and the intervals do not move
        per_image = [float(f"{v:.4g}") for v in squared.tolist()]
        results.setdefault("per_image", {}).setdefault(lib, {}).setdefault(label, {})[nfe] = per_image
    return err


def ratio_interval(diffusers_sq: list[float], fewstep_sq: list[float], draws: int = 2000) -> tuple[float, float]:
    """5-95 % bootstrap interval of the ratio of two RMS errors over the same images, the images drawn
    with replacement and paired (one image's error is heavy-tailed, so 64 images leave a wide one). It
    holds the two configurations and fewstep's fitted grid and weights fixed: the spread of the search
    and of the oracle choice among diffusers' configurations is not in it."""
    a, b = torch.tensor(diffusers_sq, dtype=torch.float64), torch.tensor(fewstep_sq, dtype=torch.float64)
    idx = torch.randint(len(a), (draws, len(a)), generator=torch.Generator().manual_seed(0))
    ratios = (a[idx].mean(1) / b[idx].mean(1)).sqrt()
    low, high = torch.quantile(ratios, torch.tensor([0.05, 0.95], dtype=torch.float64)).tolist()
    return low, high


def batch_ratios(per_image: dict, nfe: int, size: int = 64) -> list[float]:
    """The best-against-best ratio on each batch of ``size`` scored images alone (each library's best
    configuration picked on that batch, as a ``size``-image run would): how far one such run can stray."""

    def best_rms(lib: str, lo: int) -> float:
        return min(math.sqrt(sum(row[nfe][lo : lo + size]) / size) for row in per_image[lib].values() if nfe in row)

    count = len(next(row[nfe] for row in per_image["fewstep"].values() if nfe in row))
    return [best_rms("diffusers", lo) / best_rms("fewstep", lo) for lo in range(0, count - size + 1, size)]


def fewstep_steps(name: str, nfe: int) -> int:
    return max(1, (nfe + 1) // 2) if name == "heun" else nfe


def run_fewstep(name: str, override: dict, nfe: int, denoiser, schedule: Schedule, noise: Tensor):
    config = {**sampler_config(name), **override}
    spacing_options = {k: config[k] for k in ("rho", "sigma_min", "sigma_max") if config.get(k) is not None}
    options = {k: v for k, v in config.items() if k not in GRID_KEYS}
    sigmas = schedule.sigmas(fewstep_steps(name, nfe), config["spacing"], dtype=torch.float64, **spacing_options)
    counting = CountingDenoiser(denoiser)
    x = SAMPLERS[name](counting, noise * sigmas[0].to(noise.dtype), sigmas.to(noise.dtype), **options)
    return x, counting.calls


def fewstep_label(name: str, override: dict) -> str:
    config = {**sampler_config(name), **override}
    extra = "".join(f" {k}={v}" for k, v in override.items() if k != "spacing")
    return f"{name}{extra} ({config['spacing']})"


def compare(
    case: str, denoiser, schedule: Schedule, noise: Tensor, reference: Tensor, nfes, out: dict, fit_noise: Tensor, args
) -> None:
    """Fill ``out[case]`` with {label: {nfe: (calls, error)}} for both libraries; fewstep's learned
    sampler is fitted on ``fit_noise`` (another batch) and scored on ``noise``."""
    sigma_max = float(schedule.sigma_max)
    start = noise * sigma_max
    results: dict[str, dict] = {"diffusers": {}, "fewstep": {}}
    betas = schedule.betas.tolist()
    t0 = time.perf_counter()
    for label, cls_name, options, calls_of, steps_of in DIFFUSERS if args.diffusers else []:
        spacings = [("leading", False), ("linspace", False), ("trailing", False)]
        if cls_name in KARRAS_CAPABLE:
            spacings.append(("linspace", True))
        for spacing, karras in spacings:
            config = {**options, "num_train_timesteps": len(betas), "trained_betas": betas, "timestep_spacing": spacing}
            if karras:
                config["use_karras_sigmas"] = True
            name = f"{label} ({'karras' if karras else spacing})"
            for nfe in nfes:
                steps = steps_of(nfe)
                if steps < 1:
                    continue
                model = EpsModel(denoiser, schedule)
                try:
                    x = run_diffusers(cls_name, config, steps, model, start, sigma_max)
                except Exception as err:  # a configuration diffusers refuses at this step count
                    reason = (str(err).splitlines() or [""])[0][:100]  # (an assert may carry no message)
                    print(f"  {name} at {nfe} NFE: {type(err).__name__}: {reason}")
                    continue
                assert model.calls == calls_of(steps), (name, model.calls, calls_of(steps))
                record(results, "diffusers", name, nfe, model.calls, x, reference)
    t1 = time.perf_counter()
    for name, override in FEWSTEP if args.fixed else []:
        label = fewstep_label(name, override)
        for nfe in nfes:
            x, calls = run_fewstep(name, override, nfe, denoiser, schedule, noise)
            record(results, "fewstep", label, nfe, calls, x, reference)
    t2 = time.perf_counter()
    fit_calls = 0

    def fit_and_run(label: str, nfe: int, sigmas: Tensor, **options) -> None:
        """Fit learned's weights on ``fit_noise`` (the ODE solution from the top down to the schedule's
        smallest level, as the library does), run it on ``noise``, record the row, and keep grid, weights
        and result in ``candidates`` for the choice between starts."""
        nonlocal fit_calls
        counting = CountingDenoiser(denoiser)
        coefficients = fit_learned(counting, schedule, fit_noise, sigmas, **options)
        fit_calls += counting.calls
        counting, grid = CountingDenoiser(denoiser), sigmas.to(noise.dtype)
        x = SAMPLERS["learned"](counting, noise * grid[0], grid, coefficients=coefficients, **options)
        err = record(results, "fewstep", label, nfe, counting.calls, x, reference)
        print(f"  {label} at {nfe} NFE: error {err:.4g}", flush=True)
        candidates[nfe][options.get("start_from")] = (sigmas, coefficients, x)

    candidates: dict[int, dict] = {nfe: {} for nfe in nfes}
    search_noise = fit_noise[: args.search_n or None]
    for grid_name in args.learned:
        spacing, spacing_options = learned_grid(grid_name)
        for nfe in nfes:
            if spacing == "optimized":  # the grid searched with the weights fitted to every trial, as the library does
                starts = [
                    schedule.sigmas(nfe, start, dtype=torch.float64, **start_options)
                    for start, start_options in map(learned_grid, args.learned_starts)
                ]
                counting = CountingDenoiser(denoiser)
                fitted = fitted_sampler(start_sigma=float(starts[0][0]), end_sigma=schedule.sigma_min)
                sigmas = optimize_sigmas(counting, search_noise, starts, fitted, move_start=args.move_start)
                fit_calls += counting.calls
            else:
                sigmas = schedule.sigmas(nfe, spacing, dtype=torch.float64, **spacing_options)
            fit_and_run(f"learned ({grid_name})", nfe, sigmas)
    for fixed in args.learned_from:  # learned from a fixed sampler's weights, on the grid searched for it
        for nfe in nfes:
            counting = CountingDenoiser(denoiser)
            sigmas = searched_grid(counting, schedule, search_noise, nfe, fixed, move_start=args.move_start)
            fit_calls += counting.calls
            options = {"form": "data", "history": args.learned_from_history, "start_from": fixed}
            fit_and_run(f"learned from {fixed} (optimized)", nfe, sigmas, **options)
    if len(args.learned_from) > 1:  # the start the library would choose (start_from=[...]), on 32 more noises
        held_out = torch.randn((32, *noise.shape[1:]), generator=torch.Generator().manual_seed(2), dtype=noise.dtype)
        for nfe in nfes:
            fits = {name: (grid, w) for name, (grid, w, _) in candidates[nfe].items() if name in args.learned_from}
            counting = CountingDenoiser(denoiser)
            history = args.learned_from_history
            errors = start_errors(
                counting, held_out, fits, start_sigma=sigma_max, end_sigma=schedule.sigma_min, history=history
            )
            fit_calls += counting.calls
            choice = min(errors, key=errors.get)
            label = f"learned from the best of {', '.join(args.learned_from)} (optimized)"
            err = record(results, "fewstep", label, nfe, nfe, candidates[nfe][choice][2], reference)
            held = ", ".join(f"{k} {v:.4g}" for k, v in errors.items())
            print(f"  {label} at {nfe} NFE: {choice} (held-out errors {held}), error {err:.4g}", flush=True)
    t3 = time.perf_counter()
    for name in args.tuned:  # grids tuned to the model: coordinate descent (optimized) against LD3
        coordinate_descent = functools.partial(optimize_sigmas, move_start=args.move_start)
        for method, tune in (("optimized", coordinate_descent), ("ld3", ld3_sigmas)):
            if method not in args.tune_methods:
                continue
            for nfe in args.tuned_nfe:
                starts = [schedule.sigmas(nfe, s, dtype=torch.float64) for s in OPTIMIZE_FROM]
                counting, start_time = CountingDenoiser(denoiser), time.perf_counter()
                sigmas = tune(counting, fit_noise, starts, name)
                seconds = time.perf_counter() - start_time
                counting, grid = CountingDenoiser(denoiser), sigmas.to(noise.dtype)
                with torch.no_grad():
                    x = SAMPLERS[name](counting, noise * grid[0], grid)
                err = record(results, "fewstep", f"{name} ({method})", nfe, counting.calls, x, reference)
                tuning = f"tuning {seconds:.0f} s on {len(fit_noise)} noises"
                print(f"  {name} ({method}) at {nfe} NFE: error {err:.4g}; {tuning}", flush=True)
    t2 += time.perf_counter() - t3  # reported apart
    print(
        f"  ({case}: diffusers runs {t1 - t0:.0f} s, fewstep runs {t2 - t1:.0f} s, learned: fits"
        f" {fit_calls} calls on {len(fit_noise)} other noises + runs, {time.perf_counter() - t2:.0f} s)"
    )
    out[case] = results


def learned_grid(name: str) -> tuple[str, dict]:
    """``--learned`` entries: a spacing, optionally with options, e.g. ``logsnr:sigma_min=0.05``."""
    spacing, _, rest = name.partition(":")
    try:
        options = {k: float(v) for k, v in (item.split("=", 1) for item in rest.split(",") if item)}
    except ValueError:
        raise SystemExit(f"--learned {name!r}: write options as logsnr:sigma_min=0.05,sigma_max=80") from None
    return spacing, options


def best(rows: dict, nfe: int) -> tuple[str, float]:
    pool = {k: v[nfe][1] for k, v in rows.items() if nfe in v and v[nfe][1] is not None}
    label = min(pool, key=pool.get)
    return label, pool[label]


def report(case: str, results: dict, nfes) -> None:
    print(f"\n## {case}: RMS error to the converged PF-ODE solution (data units)\n")
    print("| library | sampler (spacing) | " + " | ".join(f"{n} NFE" for n in nfes) + " |")
    print("|---|---|" + "---:|" * len(nfes))
    for lib in ("diffusers", "fewstep"):
        for label, row in results[lib].items():
            cells = []
            for n in nfes:
                calls, err = row.get(n, (None, None))
                cell = "-" if err is None else f"{err:.3g}"
                cells.append(cell if calls in (None, n) else f"{cell} ({calls})")
            print(f"| {lib} | {label} | " + " | ".join(cells) + " |")
    print()
    print_best(results, nfes, results.get("per_image"))
    if "median_image" in results:
        print("\nThe same on the median image (each library's best by the median image's RMS error):\n")
        print_best(results["median_image"], nfes)


def print_best(results: dict, nfes, per_image: dict | None = None) -> None:
    """Each library's best configuration per budget and the ratio of their errors; with ``per_image``
    (squared errors by image) also the ratio's bootstrap interval over the scored images."""
    interval = per_image is not None
    header = " 5-95 % | each batch of 64 alone |" if interval else ""
    print("| NFE | best diffusers | error | best fewstep | error | diffusers / fewstep |" + header)
    print("|---:|---|---:|---|---:|---:|" + "---:|---|" * interval)
    for n in nfes:
        if not all(any(n in row for row in results.get(lib, {}).values()) for lib in ("diffusers", "fewstep")):
            continue  # a library was skipped (--no-diffusers, --no-fixed)
        (dl, de), (fl, fe) = best(results["diffusers"], n), best(results["fewstep"], n)
        line = f"| {n} | {dl} | {de:.3g} | {fl} | {fe:.3g} | {de / fe:.2f}x |"
        if interval:
            low, high = ratio_interval(per_image["diffusers"][dl][n], per_image["fewstep"][fl][n])
            batches = " / ".join(f"{r:.2f}x" for r in batch_ratios(per_image, n)) or "-"
            line += f" {low:.2f}-{high:.2f}x | {batches} |"
        print(line)


def plot(all_results: dict, nfes, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_results), figsize=(6 * len(all_results), 4.5), squeeze=False)
    for ax, (case, results) in zip(axes[0], all_results.items(), strict=True):
        for lib, style in (("diffusers", "--"), ("fewstep", "-")):
            # per method family, the best configuration at each budget
            families: dict[str, dict[int, float]] = {}
            for label, row in results[lib].items():
                family = label.split(" (")[0]
                for n, (_, err) in row.items():
                    if err is not None:
                        families.setdefault(family, {})[n] = min(err, families.get(family, {}).get(n, math.inf))
            for family, points in families.items():
                xs = sorted(points)
                ax.loglog(xs, [points[n] for n in xs], style, marker="o", ms=3, label=f"{lib}: {family}")
        ax.set_title(case, fontsize=9)
        ax.set_xlabel("network calls (NFE)")
        ax.set_ylabel("RMS error to the converged ODE solution")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"\nwrote {path}")


def gmm_case(args, out: dict) -> None:
    schedule = LinearSchedule(beta_start=1e-4, beta_end=0.02, num_timesteps=1000)
    gmm = GaussianMixture.random(args.dim, args.components, seed=0, spread=0.35)
    noise = torch.randn(args.n_gmm, args.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    start = noise * schedule.sigma_max
    t0 = time.perf_counter()
    reference = ode_reference(gmm, start, schedule.sigma_max, 1e-6, tol=1e-11)
    loose = ode_reference(gmm, start, schedule.sigma_max, 1e-6, tol=1e-8)
    case = f"Gaussian mixture, {args.dim}-d, {args.components} components, exact denoiser, float64"
    print(f"# {case}: reference in {time.perf_counter() - t0:.0f} s; rtol 1e-11 vs 1e-8: {rms(reference, loose):.1e}")
    fit_noise = torch.randn(args.n_gmm, args.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    compare(case, gmm.denoiser, schedule, noise, reference, args.nfe, out, fit_noise, args)


def load_network(path: str):
    """The raw network of a checkpoint as a denoiser (no x0 clipping: the pure probability-flow ODE of
    what was trained), its schedule, its hyperparameters and one image's shape."""
    from fewstep.diffusion import Denoiser
    from fewstep.lit import load_model

    model = load_model(path).eval().requires_grad_(False)  # ld3 differentiates for the grid only
    denoiser = Denoiser(model.sampling_net(), model.parameterisation, clip_x0=None).eval()
    hp = model.hparams
    return denoiser, model.parameterisation.schedule, hp, (hp.channels, hp.image_size, hp.image_size)


def network_noises(shape: tuple, n: int, fit_n: int) -> tuple[Tensor, Tensor]:
    """The scored noises (seed 0) and the fitting noises (seed 1) of a network case; the first k of
    either are the same for every n (benchmarks/output_span.py scores the first 64)."""
    noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(0))
    return noise, torch.randn((fit_n, *shape), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def network_reference(denoiser, schedule: Schedule, noise: Tensor, steps: int) -> Tensor:
    """The ODE solution from ``noise * sigma_max``: a float32 network, so fixed fine steps (DPM-Solver++(3M)
    on ``steps`` log-SNR steps), not an adaptive solver at 1e-6."""
    fine = schedule.sigmas(steps, "logsnr", dtype=torch.float32)
    return SAMPLERS["dpmpp_3m"](denoiser, noise * schedule.sigma_max, fine)


def fit_learned(denoiser, schedule: Schedule, fit_noise: Tensor, sigmas: Tensor, **options) -> list[list[float]]:
    """`learned`'s weights on ``sigmas`` fitted on ``fit_noise`` as the library fits them: to the ODE solution
    from the schedule's top down to its smallest level."""
    top, floor = float(schedule.sigma_max), float(schedule.sigma_min)
    return fit_coefficients(denoiser, fit_noise, sigmas, start_sigma=top, end_sigma=floor, **options)


def searched_grid(denoiser, schedule: Schedule, noise: Tensor, nfe: int, name: str, move_start: bool = True) -> Tensor:
    """The grid the library's ``spacing=optimized`` search finds for the fixed sampler ``name`` on ``noise``
    (coordinate descent from the best of its start grids): where `learned` from that sampler runs."""
    starts = [schedule.sigmas(nfe, spacing, dtype=torch.float64) for spacing in OPTIMIZE_FROM]
    return optimize_sigmas(denoiser, noise, starts, name, move_start=move_start)


def checkpoint_case(path: str, args, out: dict) -> None:
    denoiser, schedule, hp, shape = load_network(path)
    noise, fit_noise = network_noises(shape, args.n, args.fit_n or args.n)
    t0 = time.perf_counter()
    reference = network_reference(denoiser, schedule, noise, args.reference_steps)
    coarse = network_reference(denoiser, schedule, noise, args.reference_steps // 2)
    case = f"{Path(path).name}: {hp.schedule} schedule, {hp.prediction}-prediction"
    print(
        f"# {case}: reference dpmpp_3m, {args.reference_steps} log-SNR steps ({time.perf_counter() - t0:.0f} s"
        f" with the check); its distance to the {args.reference_steps // 2}-step solution: {rms(reference, coarse):.1e}"
    )
    with torch.no_grad():
        compare(case, denoiser, schedule, noise, reference, args.nfe, out, fit_noise, args)


def save(out: dict, stem: str) -> None:
    """STEM.json: every row's (calls, error) and median image; STEM.per_image.json: every row's squared
    error by image (the bulk: for the intervals, or to compare on part of the images)."""
    Path(stem).parent.mkdir(parents=True, exist_ok=True)
    tables = {case: {k: v for k, v in results.items() if k != "per_image"} for case, results in out.items()}
    Path(stem + ".json").write_text(json.dumps(tables, indent=1))
    per_image = {case: results.get("per_image", {}) for case, results in out.items()}
    Path(stem + ".per_image.json").write_text(json.dumps(per_image))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", action="append", default=[], help="a trained fewstep checkpoint (repeatable)")
    parser.add_argument("--no-gmm", action="store_true", help="only the checkpoints")
    parser.add_argument("--dim", type=int, default=784)
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--n-gmm", type=int, default=256, help="mixture samples")
    parser.add_argument(
        "--n", type=int, default=256, help="images per network case (heavy-tailed errors: 64 can miss the far-off ones)"
    )
    parser.add_argument(
        "--reference-steps", type=int, default=REFERENCE_STEPS, help="fine steps of a network's reference"
    )
    parser.add_argument("--nfe", type=int, nargs="+", default=list(NFES))
    parser.add_argument(
        "--learned",
        nargs="*",
        default=["karras", "logsnr"],
        help="grids of the learned sampler: spacings (logsnr:sigma_min=0.05 with options) or optimized",
    )
    parser.add_argument(
        "--learned-starts",
        nargs="+",
        default=list(OPTIMIZE_FROM),
        help="grids the learned optimized search starts from (default: the library's)",
    )
    parser.add_argument(
        "--learned-from",
        nargs="*",
        default=["unipc"],
        help="learned (data form) refined from these samplers' weights, on the grid optimized for each",
    )
    parser.add_argument("--learned-from-history", type=int, default=3, help="weights per step of those")
    parser.add_argument("--fit-n", type=int, default=0, help="noises to fit learned on, network cases (0: --n)")
    parser.add_argument(
        "--search-n", type=int, default=0, help="of those, how many the optimized search uses (0: all; library: 16)"
    )
    parser.add_argument(
        "--tuned", nargs="*", default=["dpmpp_2m"], help="samplers whose grid is tuned: optimized against ld3"
    )
    parser.add_argument(
        "--tune-methods", nargs="+", choices=["optimized", "ld3"], default=["optimized", "ld3"], help="grid tuners"
    )
    parser.add_argument("--tuned-nfe", type=int, nargs="+", default=[5, 10], help="budgets of the tuned grids")
    parser.add_argument(
        "--fixed-start",
        dest="move_start",
        action="store_false",
        help="optimized searches keep the schedule's top level (the library lets it move)",
    )
    parser.add_argument("--no-diffusers", dest="diffusers", action="store_false", help="skip diffusers' schedulers")
    parser.add_argument("--no-fixed", dest="fixed", action="store_false", help="skip fewstep's fixed-grid samplers")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--out", default=str(ROOT / "assets" / "vs_diffusers"), help="writes OUT.json, OUT.per_image.json, OUT.png"
    )
    parser.add_argument("--quick", action="store_true", help="64-d mixture, 5 and 10 NFE")
    args = parser.parse_args()
    if args.quick:
        args.dim, args.n_gmm, args.nfe, args.out = 64, 64, [5, 10], "/tmp/vs_diffusers_quick"
    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers

    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}")
    out: dict = {}
    if not args.no_gmm:
        gmm_case(args, out)
    for path in args.ckpt:
        checkpoint_case(path, args, out)
        save(out, args.out)  # each case as soon as it is done
    for case, results in out.items():
        report(case, results, args.nfe)
    save(out, args.out)
    plot(out, args.nfe, Path(args.out + ".png"))


if __name__ == "__main__":
    main()
