"""FID of sampler configurations side by side on one checkpoint: the same noise, features and n for every row.

    python benchmarks/fid_sweep.py --ckpt CKPT --row "ddpm steps=1000" --row "auto steps=10"
    python benchmarks/fid_sweep.py --ckpt CKPT --preset fid10 --n 2000 --seeds 0 1 --device cuda --out sweep.json
    python benchmarks/fid_sweep.py --ckpt CKPT --plugin my_sampler.py --row "my_sampler steps=10"
    python benchmarks/fid_sweep.py --ckpt CKPT --rows rows.txt      # one row per line

A row is a sampler name and ``key=value`` options, as ``sample.py`` takes them (``sampler=NAME
sampler.KEY=VALUE``): grid options (``spacing``, ``rho``, ``sigma_min``, ``sigma_max``) and the
sampler's own (``eta``, ``s_noise``, ...); values are read as YAML (``eta=1.2``, ``spacing=karras``).
Each row draws ``--n`` samples for every seed of ``--seeds`` through ``DiffusionModel.sample_batches``,
so sample i of seed s starts from the same noise in every row and is the sample ``sample.py seed=s``
draws; the FID is that of ``sample.py eval=true`` (features from ``features=auto``:
the feature classifier on MNIST-5k, cached in ``logs/cache``). Two seeds give two independent FIDs per
row: their spread says which differences between rows are noise.

``--plugin FILE`` runs a Python file first: a sampler it registers (``fewstep.samplers.register``)
can be named in a row, to try a new method against the built-in ones on the same noise.
Presets: ``fid10`` (the ``sampler=auto`` candidates at 10 network calls, ``auto`` at other step
counts, and 1000-step DDPM).
"""

from __future__ import annotations

import argparse
import json
import runpy
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf

from fewstep.lit import load_model
from fewstep.precision import cpu_name
from fewstep.sample import build_scores

SDE = "dpmpp_2m_sde steps=10 spacing=karras"
PRESETS: dict[str, list[str]] = {
    "fid10": [
        "ddpm steps=1000",
        "auto steps=10",
        "dpmpp_2m steps=10 spacing=karras",
        "unipc steps=10 spacing=trailing order=2",
        # the SDE's grid: where it starts (auto: sigma 20), Karras rho, its lower end, other spacings
        SDE,  # from the schedule's top (157 on the linear schedule)
        *(f"{SDE} sigma_max={hi}" for hi in (10, 15, 30, 80)),
        *(f"{SDE} rho={rho}" for rho in (5, 10)),
        *(f"{SDE} sigma_min={lo}" for lo in (0.05, 0.1)),
        "dpmpp_2m_sde steps=10 spacing=logsnr",
        # the SDE's noise
        *(f"{SDE} eta={eta}" for eta in (0.75, 1.25)),
        "ddpm steps=10",
        # auto at other step counts, towards 1000-step DDPM
        *(f"auto steps={n}" for n in (5, 8, 15, 20, 50, 100)),
    ],
}


def parse_row(row: str) -> tuple[str, dict[str, Any]]:
    """``"NAME k=v ..."`` -> (NAME, {k: v}) with YAML values."""
    name, *pairs = row.split()
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"row {row!r}: {pair!r} is not key=value (e.g. eta=1.0)")
        options[key] = yaml.safe_load(value)
    return name, options


def machine(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a fewstep checkpoint (e.g. make train's last.ckpt)")
    parser.add_argument("--row", action="append", default=[], help='"NAME key=value ..." (repeatable)')
    parser.add_argument("--rows", help="a file of rows, one per line (# starts a comment)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a list of rows (before any --row)")
    parser.add_argument("--n", type=int, default=1000, help="samples per row and seed (default 1000)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="noise seeds (default 0: sample.py's)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--plugin", action="append", default=[], help="a Python file run first (registers samplers)")
    parser.add_argument("--cache-dir", default="logs/cache", help="feature classifier and reference statistics")
    parser.add_argument("--out", help="write the rows as JSON here (after every row)")
    args = parser.parse_args(argv)
    listed = Path(args.rows).read_text().splitlines() if args.rows else []
    listed = [line.split("#", 1)[0].strip() for line in listed]
    rows = [*(PRESETS[args.preset] if args.preset else []), *filter(None, listed), *args.row]
    if not rows:
        parser.error("give --row, --rows and/or --preset")
    parsed = [parse_row(row) for row in rows]  # bad rows fail before anything runs
    if args.n < 2:
        parser.error(f"--n must be >= 2 (FID fits a covariance), got {args.n}")
    for path in args.plugin:
        runpy.run_path(path)

    device = torch.device(args.device)
    if device.type == "cuda":  # the CPU's float32 arithmetic, not TF32: rows comparable with CPU runs
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    model = load_model(args.ckpt, map_location=device)
    cfg = OmegaConf.create(
        {
            "ckpt": args.ckpt,
            "features": {"name": "auto", "cache_dir": args.cache_dir},
            "evaluation": {"metrics": ["fid"]},
        }
    )
    scores = build_scores(cfg, model, device)
    where = machine(device)
    print(f"{args.ckpt}: n={args.n} per seed, seeds {args.seeds}, {scores.features} features, {where}\n")
    print(f"| sampler | NFE | {' | '.join(f'FID seed {s}' for s in args.seeds)} | mean FID | s / image |")
    print(f"|---|---:|{'---:|' * len(args.seeds)}---:|---:|")
    results: list[dict[str, Any]] = []
    for row, (name, options) in zip(rows, parsed, strict=True):
        fids, seconds, nfe, spec = [], 0.0, 0.0, None
        for seed in args.seeds:
            scores.reset()
            start = time.perf_counter()
            for result in model.sample_batches(args.n, name, seed=seed, batch_size=args.batch_size, **options):
                scores.update(result.images)
                nfe, spec = max(nfe, result.nfe), result.spec
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - start
            fids.append(scores.compute()["fid"])
        mean = sum(fids) / len(fids)
        results.append(
            {
                "row": row,
                "sampler": spec.name if spec else name,
                "steps": spec.steps if spec else None,
                "spacing": spec.spacing if spec else None,
                "spacing_options": dict(spec.spacing_options) if spec else {},
                "options": {k: v for k, v in (spec.options if spec else {}).items() if k != "coefficients"},
                "nfe": nfe,
                "fid": dict(zip(map(str, args.seeds), fids, strict=True)),
                "fid_mean": mean,
                "seconds_per_image": seconds / (args.n * len(args.seeds)),
                "n": args.n,
                "features": scores.features,
                "device": where,
            }
        )
        print(
            f"| {row} | {nfe:g} | {' | '.join(f'{f:.3f}' for f in fids)} | {mean:.3f} |"
            f" {results[-1]['seconds_per_image']:.4f} |",
            flush=True,
        )
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
