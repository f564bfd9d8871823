"""How much lower could a linear combination of one trajectory's network outputs go? An upper limit for
learned sampler weights on a trained network.

    python benchmarks/output_span.py --ckpt last.ckpt                 # 5 and 10 NFE, 64 images, ~10 min
    python benchmarks/output_span.py --ckpt last.ckpt --nfe 5 --start-from dpmpp_3m

`learned` (data form) ends at ``x_N = sum_j a_j D_j + b x_0``: a fixed combination of the start and the
denoiser outputs met along the way. This script runs the library's `learned` sampler as the benchmark
against diffusers does (``benchmarks/vs_diffusers.py``: the grid searched for the ``--start-from`` sampler
on 16 noises of seed 1, the weights refined from that sampler's on 64, the same 64 scored images of seed 0
and the same reference, DPM-Solver++(3M) on 400 log-SNR steps) and then asks, *per image*, for the least
squares combination of the same vectors closest to that image's reference: an oracle with its own weights
for every image, which no shared weights can beat on that trajectory. Where this oracle is still above a
target error, better final weights cannot reach it; only other network outputs can (another grid, other
states on the way, more calls). It is a limit for the final combination only: other weights earlier on
would lead through other states to other outputs.
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
    network_noises,
    network_reference,
    rms,
    searched_grid,
)

from fewstep.samplers import SAMPLERS


def span_oracle(vectors: list[Tensor], target: Tensor) -> float:
    """RMS distance of every image of ``target`` to its least-squares combination of the same image
    of ``vectors`` (each of ``target``'s shape): the best any per-image weights could do."""
    basis = torch.stack([v.flatten(1) for v in vectors], -1).double()  # images, pixels, vectors
    y = target.flatten(1).double().unsqueeze(-1)
    best = basis @ torch.linalg.lstsq(basis, y).solution
    return rms(best, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--start-from", nargs="+", default=["unipc", "dpmpp_3m"], help="learned's starts")
    parser.add_argument("--n", type=int, default=64, help="scored images (the benchmark's first n)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    denoiser, schedule, _, shape = load_network(args.ckpt)
    noise, fit_noise = network_noises(shape, args.n, 64)  # the benchmark's scored and fitting noises
    start = time.perf_counter()
    reference = network_reference(denoiser, schedule, noise, REFERENCE_STEPS)
    print(f"# {args.ckpt}: reference {time.perf_counter() - start:.0f} s")
    columns = ["NFE", "learned from (its grid)", "error", "oracle: outputs", "oracle: outputs + start"]
    print("| " + " | ".join([*columns, "last output, scaled per image"]) + " |")
    print("|---:|---|---:|---:|---:|---:|")
    for nfe in args.nfe:
        for name in args.start_from:
            grid = searched_grid(denoiser, schedule, fit_noise[:16], nfe, name)
            options = {"form": "data", "history": 3, "start_from": name}
            weights = fit_learned(denoiser, schedule, fit_noise, grid, **options)
            outputs: list[Tensor] = []
            grid = grid.float()
            with torch.no_grad():
                x = SAMPLERS["learned"](
                    denoiser,
                    noise * grid[0],
                    grid,
                    coefficients=weights,
                    callback=lambda info, kept=outputs: kept.append(info["denoised"].clone()),
                    **options,
                )
            cells = [
                rms(x, reference),
                span_oracle(outputs, reference),
                span_oracle([noise * grid[0], *outputs], reference),
                span_oracle(outputs[-1:], reference),
            ]
            print(f"| {nfe} | {name} | " + " | ".join(f"{c:.4g}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
