"""Sampler benchmark: accuracy vs network calls on a Gaussian mixture, and per-sampler overhead.

    python benchmarks/samplers.py                      # ~3-5 min on 2 CPU cores
    python benchmarks/samplers.py --quick              # smaller problem, for a smoke run
    python benchmarks/samplers.py --part unet          # only the U-Net overhead table

Part 1 (float64, exact denoiser of a Gaussian mixture, tests/gmm.py): for every sampler and a
budget of about 5/10/20/50 network calls (NFE, counted by wrapping the denoiser), the RMS distance
to the exact PF-ODE solution x_T -> x_0 (deterministic samplers only), the Frechet distance and
sliced Wasserstein-2 distance to true samples, the mixture-weight error and the wall time per sample.
All samplers start from the same noise on the DDPM linear schedule (sigma from 157 down to 0.01),
each with its default spacing from conf/sampler. Writes a log-log plot of ODE error vs NFE.

Part 2: the time a sampler spends beyond its network calls, with the tiny U-Net on the CPU.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the Gaussian mixture and its exact ODE solution

from gmm import GaussianMixture, ode_reference  # noqa: E402

from fewstep.config import sampler_config  # noqa: E402
from fewstep.diffusion.sampling import CountingDenoiser as Counting  # noqa: E402
from fewstep.diffusion.schedules import LinearSchedule  # noqa: E402
from fewstep.samplers import SAMPLERS  # noqa: E402
from fewstep.samplers.optimize import optimize_sigmas  # noqa: E402

GRID_KEYS = ("name", "steps", "spacing", "rho", "sigma_min", "sigma_max")
NFES = (5, 10, 20, 50)


def config(name: str) -> tuple[str, dict, dict]:
    """(spacing, spacing options, sampler options) from conf/sampler/NAME.yaml."""
    cfg = sampler_config(name)
    spacing_options = {k: cfg[k] for k in ("rho", "sigma_min", "sigma_max") if cfg.get(k) is not None}
    return cfg["spacing"], spacing_options, {k: v for k, v in cfg.items() if k not in GRID_KEYS}


def steps_for(name: str, nfe: int, options: dict) -> tuple[int, dict]:
    """Grid size (and options) whose cost comes closest to ``nfe`` without exceeding it where possible."""
    if name == "heun":  # 2 calls per step, 1 for the last (Euler to 0)
        return max(1, (nfe + 1) // 2), options
    if name == "pc":
        return max(1, nfe // (options.get("n_corrector", 1) + 1)), options
    if name == "annealed_langevin":  # levels * n_steps_each + 1 final denoising call
        each = max(1, round(math.sqrt(nfe - 1)))
        return max(1, (nfe - 1) // each), {**options, "n_steps_each": each}
    return nfe, options


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussian fits (the FID formula)."""
    ma, mb = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm(ca)
    cross = _sqrtm(root_a @ cb @ root_a)
    return float((ma - mb).pow(2).sum() + torch.trace(ca + cb - 2 * cross))


def _sqrtm(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T


def sliced_w2(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=a.dtype)
    dirs = dirs / dirs.norm(dim=0)
    pa, _ = (a @ dirs).sort(0)
    pb, _ = (b @ dirs).sort(0)
    return float((pa - pb).pow(2).mean().sqrt())


def weight_error(gmm: GaussianMixture, x: torch.Tensor) -> float:
    """L1 distance of the mean responsibilities E[p(k | x)] from the true weights (0 in expectation)."""
    return float((gmm.responsibilities(x).mean(0) - gmm.weights).abs().sum())


def fmt(v: float | None, spec: str = ".2e") -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--n", type=int, default=2000, help="samples per run")
    parser.add_argument("--nfe", type=int, nargs="+", default=list(NFES), help="network-call budgets")
    parser.add_argument("--quick", action="store_true", help="dim 8, 500 samples, Gaussian-mixture part only")
    parser.add_argument("--plot", default=str(ROOT / "assets" / "samplers_error.png"))
    parser.add_argument("--part", choices=("all", "gmm", "unet"), default="all")
    parser.add_argument("--device", default="cpu", help="where the U-Net overhead part runs (e.g. cuda)")
    parser.add_argument("--batch", type=int, nargs="+", default=[8], help="U-Net overhead batch size(s)")
    args = parser.parse_args()
    if args.quick:
        args.dim, args.n, args.part = 8, 500, "gmm"
        if args.plot == parser.get_default("plot"):  # keep the committed full-run plot
            args.plot = str(Path(tempfile.gettempdir()) / "samplers_error_quick.png")
    torch.set_num_threads(1)  # steadier timings on a shared machine
    schedule = LinearSchedule(beta_start=1e-4, beta_end=0.02, num_timesteps=1000)
    if args.part != "unet":
        gaussian_mixture(args, schedule)
    if args.part != "gmm":
        for batch in args.batch:
            unet_overhead(schedule, batch=batch, device=torch.device(args.device))


def gaussian_mixture(args: argparse.Namespace, schedule: LinearSchedule) -> None:

    gmm = GaussianMixture.random(args.dim, args.components, seed=0, spread=0.35)
    sigma_max, sigma_min = schedule.sigma_max, schedule.sigma_min
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(args.n, args.dim, generator=g, dtype=torch.float64)
    truth = gmm.sample(args.n, g)
    truth2 = gmm.sample(args.n, g)
    t0 = time.perf_counter()
    exact = ode_reference(gmm, noise * sigma_max, sigma_max, 1e-5)  # the PF-ODE map x_T -> x_0
    floor = ode_reference(gmm, noise * sigma_max, sigma_max, sigma_min)  # ... stopped at sigma_min, denoised
    print(f"# Gaussian mixture: dim {args.dim}, {args.components} components, {args.n} samples, float64")
    print(f"reference ODE solutions: {time.perf_counter() - t0:.1f} s")
    stop_error = math.sqrt(float((floor - exact).pow(2).sum(1).mean()))
    print(
        f"floors: ODE error of stopping at sigma_min={sigma_min:.3g} {stop_error:.2e};"
        f" true-vs-true FD {frechet(truth, truth2):.3f}, SW2 {sliced_w2(truth, truth2):.4f},"
        f" weight L1 {weight_error(gmm, truth2):.4f}\n"
    )

    deterministic = [
        ("euler", {}),
        ("heun", {}),
        ("ddim", {}),
        ("ddim", {"spacing": "karras"}),
        ("dpmpp_2m", {}),
        ("dpmpp_2m", {"spacing": "logsnr"}),
        ("dpmpp_3m", {}),
        ("dpmpp_3m", {"spacing": "logsnr"}),
        ("unipc", {"order": 2}),
        ("unipc", {"order": 2, "spacing": "logsnr"}),
        ("unipc", {"order": 3}),
        ("ipndm", {"variable_step": False}),
        ("ipndm", {"variable_step": True}),
        ("dpmpp_2m", {"spacing": "optimized"}),
        ("unipc", {"spacing": "optimized"}),
    ]
    stochastic = [
        ("ddpm", {}),
        ("dpmpp_2m_sde", {}),
        ("euler_maruyama", {}),
        ("pc", {}),
        ("annealed_langevin", {}),
        ("heun", {"s_churn": 40.0}),
    ]
    opt_noise = torch.randn(256, args.dim, generator=g, dtype=torch.float64)
    rows, curves, default_configs = [], {}, set()
    for (name, override), is_ode in [(case, True) for case in deterministic] + [(case, False) for case in stochastic]:
        spacing, spacing_options, options = config(name)
        override = dict(override)
        spacing = override.pop("spacing", spacing)
        options = {**options, **override}
        label = name + "".join(f" {k}={v}" for k, v in override.items()) + f" ({spacing})"
        if spacing == config(name)[0] and all(config(name)[2].get(k) == v for k, v in override.items()):
            default_configs.add(label)  # the sampler exactly as conf/sampler/NAME.yaml sets it up
        for target in args.nfe:
            steps, run_options = steps_for(name, target, options)
            if spacing == "optimized":  # searched from the best of three standard grids, on other noise
                inits = [schedule.sigmas(steps, s, dtype=torch.float64) for s in ("karras", "logsnr", "quadratic")]
                # the first level moves too, as in the library's search
                search = {"options": run_options, "max_sweeps": 8, "move_start": True}
                sigmas = optimize_sigmas(gmm.denoiser, opt_noise, inits, name, **search)
            else:
                sigmas = schedule.sigmas(steps, spacing, dtype=torch.float64, **spacing_options)
            den = Counting(gmm.denoiser)
            start = time.perf_counter()
            x = SAMPLERS[name](
                den, noise * sigmas[0], sigmas, generator=torch.Generator().manual_seed(1), **run_options
            )
            seconds = time.perf_counter() - start
            ode_err = math.sqrt(float((x - exact).pow(2).sum(1).mean())) if is_ode else None
            rows.append(
                (
                    label,
                    target,
                    den.calls,
                    ode_err,
                    frechet(x, truth),
                    sliced_w2(x, truth),
                    weight_error(gmm, x),
                    seconds / args.n * 1e6,
                )
            )
            if is_ode:
                curves.setdefault(label, []).append((den.calls, ode_err))
    for tol in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
        den, stats = Counting(gmm.denoiser), {}
        sigmas = schedule.sigmas(2, "karras", dtype=torch.float64)
        start = time.perf_counter()
        x = SAMPLERS["ode_rk45"](den, noise * sigmas[0], sigmas, rtol=tol, atol=tol, stats=stats)
        seconds = time.perf_counter() - start
        ode_err = math.sqrt(float((x - exact).pow(2).sum(1).mean()))
        rows.append(
            (
                f"ode_rk45 tol={tol:g}",
                None,
                stats["nfe"],
                ode_err,
                frechet(x, truth),
                sliced_w2(x, truth),
                weight_error(gmm, x),
                seconds / args.n * 1e6,
            )
        )
        curves.setdefault("ode_rk45 (adaptive)", []).append((stats["nfe"], ode_err))

    print("| sampler | NFE target | NFE | ODE RMS error | FD | SW2 | weight L1 | us / sample |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, target, nfe, ode_err, fd, sw, werr, us in rows:
        print(f"| {label} | {target or '-'} | {nfe} | {fmt(ode_err)} | {fd:.3g} | {sw:.3g} | {werr:.3f} | {us:.1f} |")

    at10 = {label: err for label, target, _, err, *_ in rows if target == 10 and err is not None}
    if {"ddim (trailing)", "ddim (karras)"} <= set(at10):
        print()
        for scope, pool in [
            ("any config", at10),
            ("default configs", {k: at10[k] for k in default_configs & set(at10)}),
        ]:
            best = min(pool, key=pool.get)
            ratios = ", ".join(f"{at10[d] / pool[best]:.1f}x below {d}" for d in ("ddim (trailing)", "ddim (karras)"))
            print(f"at 10 NFE, best of {scope}: {best} {pool[best]:.2e}, {ratios}")
    plot(curves, stop_error, args.plot)


def plot(curves: dict, floor: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = plt.get_cmap("tab20").colors
    for i, (label, points) in enumerate(curves.items()):
        nfe, err = zip(*sorted(points), strict=True)
        style = "--" if "ode_rk45" in label or "optimized" in label else "-"
        ax.loglog(nfe, err, marker="os^vD"[i % 5], ms=3, label=label, ls=style, color=colors[i % 20])
    ax.axhline(floor, color="grey", ls=":", lw=1, label="floor: stop at sigma_min, denoise")
    ax.set_xlabel("network calls (NFE)")
    ax.set_ylabel("RMS error to the exact PF-ODE solution")
    ax.set_title("Gaussian mixture, exact denoiser (benchmarks/samplers.py)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nwrote {path}")


def unet_overhead(
    schedule: LinearSchedule, nfe: int = 20, batch: int = 8, repeats: int = 5, device: torch.device | None = None
) -> None:
    """Sampling time minus the time of the same number of bare network calls, tiny U-Net (CPU or GPU).

    On a GPU every timing ends with a device sync, so the figure is the sampler's own kernels and
    Python time beyond the network's, as a user waiting for the images sees it."""
    device = device or torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        from fewstep.diffusion import Denoiser
        from fewstep.nn import UNet
    except ImportError as err:  # the network lives in another issue; skip rather than fail
        print(f"\nU-Net overhead skipped: {err}")
        return
    torch.manual_seed(0)
    net = (
        UNet(
            image_size=32,
            in_channels=1,
            base_channels=32,
            channel_mult=(1, 2, 2),
            num_res_blocks=1,
            attention_resolutions=(8,),
            dropout=0.0,
        )
        .eval()
        .to(device)
    )
    denoiser = Denoiser(net, schedule, prediction="eps")
    x1 = torch.randn(batch, 1, 32, 32, device=device)
    t = torch.full((batch,), 500.0, device=device)

    def bare(calls: int) -> float:
        with torch.no_grad():
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                net(x1, t)
            sync()
            return time.perf_counter() - start

    bare(3)  # warm-up
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "1 CPU thread"
    print(f"\n## Overhead beyond network calls: tiny U-Net, batch {batch} x 1 x 32 x 32, float32, {where}\n")
    print("| sampler | NFE | sampling ms | bare calls ms | overhead ms | overhead % |")
    print("|---|---:|---:|---:|---:|---:|")
    names = [n for n in sorted(SAMPLERS) if n != "ode_rk45"] + ["ode_rk45"]
    for name in names:
        spacing, spacing_options, options = config(name)
        steps, options = steps_for(name, nfe, options)
        if name == "ode_rk45":
            steps, options = 2, {**options, "rtol": 1e-2, "atol": 1e-2}
        sigmas = schedule.sigmas(steps, spacing, dtype=torch.float32, **spacing_options).to(device)
        best, base = math.inf, math.inf
        for _ in range(repeats):  # interleaved, best of each: the machine may be shared
            den = Counting(denoiser)
            generator = torch.Generator(device=device).manual_seed(0)
            sync()
            start = time.perf_counter()
            SAMPLERS[name](den, x1 * sigmas[0], sigmas, generator=generator, **options)
            sync()
            best, calls = min(best, time.perf_counter() - start), den.calls
            base = min(base, bare(calls))
        print(
            f"| {name} | {calls} | {best * 1e3:.0f} | {base * 1e3:.0f} | {(best - base) * 1e3:.1f} |"
            f" {100 * (best - base) / base:.1f} |"
        )


if __name__ == "__main__":
    main()
