"""How much does `learned`'s error depend on the noises its weights were fitted on? Refits on disjoint batches.

    python benchmarks/fit_spread.py --ckpt last.ckpt                    # 10 NFE from UniPC, 4 batches, ~17 min
    python benchmarks/fit_spread.py --ckpt last.ckpt --nfe 5 --start-from dpmpp_3m --versus 0.175

The benchmark against diffusers (``benchmarks/vs_diffusers.py``) fits `learned` once, on 64 noises of seed 1.
This script keeps everything else of that row (the grid searched for ``--start-from`` on the first 16 of those
noises, the 256 scored images of seed 0 and their reference, DPM-Solver++(3M) on 400 log-SNR steps) and refits
the weights from the start sampler's, as the library does, on each of ``--batches`` disjoint batches of 64
fitting noises of the same seed; the first batch is the benchmark's own. It prints the RMS and median-image
error of the start sampler itself, of each refit, and of the mean of the refitted weight sets (averaging fits
on disjoint batches, "bagging", trades their spread for the cost of several fits). ``--versus``: diffusers'
best error at that NFE on the same images, to print the ratio the benchmark reports.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor
from vs_diffusers import (  # (this folder is on the path)
    REFERENCE_STEPS,
    fit_learned,
    load_network,
    median_image_error,
    network_noises,
    network_reference,
    rms,
    searched_grid,
)

from fewstep.samplers import SAMPLERS
from fewstep.samplers.learned import multistep_weights

BATCH = 64  # the benchmark's (and the library's) number of fitting noises


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--nfe", type=int, default=10)
    parser.add_argument("--start-from", default="unipc", help="the sampler whose weights the fits start from")
    parser.add_argument("--batches", type=int, default=4, help="disjoint batches of 64 fitting noises")
    parser.add_argument("--n", type=int, default=256, help="scored images (the benchmark's first n)")
    parser.add_argument("--versus", type=float, default=None, help="diffusers' best error, for the ratio")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.batches < 1 or args.n < 1:
        parser.error("--batches and --n must be at least 1")
    torch.set_num_threads(args.threads)

    denoiser, schedule, _, shape = load_network(args.ckpt)
    noise, fit_noise = network_noises(shape, args.n, BATCH * args.batches)
    start = time.perf_counter()
    reference = network_reference(denoiser, schedule, noise, REFERENCE_STEPS)
    print(f"# {args.ckpt}: reference {time.perf_counter() - start:.0f} s", flush=True)
    start = time.perf_counter()
    grid = searched_grid(denoiser, schedule, fit_noise[:16], args.nfe, args.start_from)
    print(f"# {args.start_from}'s grid at {args.nfe} NFE ({time.perf_counter() - start:.0f} s):", grid.tolist())
    options = {"form": "data", "history": 3, "start_from": args.start_from}

    def row(label: str, weights: list[list[float]]) -> None:
        with torch.no_grad():
            x = SAMPLERS["learned"](denoiser, noise * grid[0], grid.float(), coefficients=weights, **options)
        error, median = rms(x, reference), median_image_error(x, reference)
        ratio = f"{args.versus / error:.2f}x" if args.versus else "-"
        print(f"| {label} | {error:.4g} | {median:.4g} | {ratio} |", flush=True)

    print("| weights | RMS error | median image | diffusers' best / it |\n|---|---:|---:|---:|")
    row(f"{args.start_from} itself", multistep_weights(args.start_from, grid, 3))
    fits: list[Tensor] = []
    for b in range(args.batches):
        start = time.perf_counter()
        batch = fit_noise[b * BATCH : (b + 1) * BATCH]
        weights = fit_learned(denoiser, schedule, batch, grid, **options)
        fits.append(torch.tensor(weights, dtype=torch.float64))
        label = f"refit on batch {b + 1}{' (the benchmark)' if b == 0 else ''}"
        row(f"{label}, {time.perf_counter() - start:.0f} s", weights)
    if args.batches > 1:
        row(f"mean of the {args.batches} weight sets", torch.stack(fits).mean(0).tolist())


if __name__ == "__main__":
    main()
