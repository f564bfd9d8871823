"""FID of sampler configurations side by side on one checkpoint: the same noise, features and n for every row.

    python benchmarks/fid_sweep.py --ckpt CKPT --row "ddpm steps=1000" --row "auto steps=10"
    python benchmarks/fid_sweep.py --ckpt CKPT --preset fid10 --n 2000 --seeds 0 1 --device cuda --out sweep.json
    python benchmarks/fid_sweep.py --ckpt CKPT --plugin my_sampler.py --row "my_sampler steps=10"
    python benchmarks/fid_sweep.py --ckpt CKPT --rows rows.txt      # one row per line
    python benchmarks/fid_sweep.py --ckpt CKPT --out sweep.json --reuse --baseline "ddpm steps=1000" \
        --row "ddpm steps=1000" --row "auto steps=10"                # DDPM scored once, kept in sweep.json

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
``--reuse`` takes the FID of a (row, seed) from ``--out`` when it was scored there with the same
checkpoint (by its SHA-256), n, features and device type (CPU or CUDA), so that a slow row (1000-step
DDPM: an hour on a CPU) runs once and later sweeps add rows or seeds to the same file. Rows of the file
that are not asked for stay in it; ``fid_mean`` is over this run's seeds, ``fid`` keeps every seed
scored. It trusts the file: after changing a sampler's code, drop ``--reuse``. ``--baseline ROW`` runs
that row first and adds a column: each row's mean FID over the seeds divided by the baseline's
(``"ddpm steps=1000"`` for the 10-call target).
Presets: ``fid10`` (the ``sampler=auto`` candidates at 10 network calls, ``auto`` at other step
counts, and 1000-step DDPM).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
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


# what a record says of how its row ran (taken over as it is when every seed of a row is reused)
DESCRIPTION = ("sampler", "steps", "spacing", "spacing_options", "options", "nfe", "seconds_per_image", "device")


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


def checkpoint_id(path: str) -> str:
    """What ties a stored FID to its checkpoint: the file's SHA-256 (a retrained model at the same path
    has the same size but other weights)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_records(path: str) -> list[dict[str, Any]]:
    """The rows an earlier run wrote to ``path`` ([] if there is no such file)."""
    if not Path(path).exists():
        return []
    try:
        records = json.loads(Path(path).read_text())
    except ValueError:
        records = None
    if not isinstance(records, list) or not all(isinstance(r, dict) and "row" in r for r in records):
        raise SystemExit(f"--out {path} is not a fid_sweep JSON file: give another --out path")
    return records


def matching(records: list[dict[str, Any]], row: str, key: dict[str, Any]) -> dict[str, Any] | None:
    """The stored record of ``row`` scored with the same checkpoint, n, features and device type."""
    return next((r for r in records if r["row"] == row and all(r.get(k) == v for k, v in key.items())), None)


def merge(records: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` with the rows of ``new`` replaced where they stand, and ``new``'s other rows appended."""
    fresh = {record["row"]: record for record in new}
    return [fresh.pop(record["row"], record) for record in records] + list(fresh.values())


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
    parser.add_argument("--reuse", action="store_true", help="take FIDs already in --out (same ckpt, n, features)")
    parser.add_argument("--baseline", help="a row to divide every row's mean FID by (e.g. 'ddpm steps=1000')")
    args = parser.parse_args(argv)
    listed = Path(args.rows).read_text().splitlines() if args.rows else []
    listed = [line.split("#", 1)[0].strip() for line in listed]
    rows = [*(PRESETS[args.preset] if args.preset else []), *filter(None, listed), *args.row]
    rows = list(dict.fromkeys(" ".join(row.split()) for row in rows))  # each row once, spaced as stored
    if not rows:
        parser.error("give --row, --rows and/or --preset")
    baseline = " ".join(args.baseline.split()) if args.baseline else None
    if baseline is not None:
        if baseline not in rows:
            parser.error(f"--baseline {args.baseline!r} is not one of the rows; add it with --row")
        rows.insert(0, rows.pop(rows.index(baseline)))  # first, so that every row after it shows its ratio
    if args.reuse and not args.out:
        parser.error("--reuse takes the FIDs stored in --out FILE: give --out")
    stored = read_records(args.out) if args.out else []
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
    key = {
        "ckpt_sha256": checkpoint_id(args.ckpt),
        "n": args.n,
        "features": scores.features,
        "device_type": device.type,
    }
    print(f"{args.ckpt}: n={args.n} per seed, seeds {args.seeds}, {scores.features} features, {where}\n")
    ratio_head, ratio_rule = (f" / {baseline} |", "---:|") if baseline else ("", "")
    print(f"| sampler | NFE | {' | '.join(f'FID seed {s}' for s in args.seeds)} | mean FID |{ratio_head} s / image |")
    print(f"|---|---:|{'---:|' * len(args.seeds)}---:|{ratio_rule}---:|")
    results: list[dict[str, Any]] = []
    any_reused = False
    for row, (name, options) in zip(rows, parsed, strict=True):
        old = matching(stored, row, key) if args.reuse else None
        earlier = dict(old["fid"]) if old else {}
        fids, seconds, computed, nfe, spec = {}, 0.0, 0, 0.0, None
        for seed in map(str, args.seeds):
            if seed in earlier:
                fids[seed] = earlier[seed]
                any_reused = True
                continue
            scores.reset()
            start = time.perf_counter()
            for result in model.sample_batches(args.n, name, seed=int(seed), batch_size=args.batch_size, **options):
                scores.update(result.images)
                nfe, spec = max(nfe, result.nfe), result.spec
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds, computed = seconds + time.perf_counter() - start, computed + 1
            fids[seed] = scores.compute()["fid"]
        if spec is not None:
            described = {
                "sampler": spec.name,
                "steps": spec.steps,
                "spacing": spec.spacing,
                "spacing_options": dict(spec.spacing_options),
                "options": {k: v for k, v in spec.options.items() if k != "coefficients"},
                "nfe": nfe,
                "seconds_per_image": seconds / (args.n * computed),
                "device": where,
            }
        else:  # every seed reused: the stored record describes the run
            described = {k: old[k] for k in DESCRIPTION if k in old}
        all_fids = {**earlier, **fids}  # seeds scored before and not asked for now stay in the file
        mean = sum(fids.values()) / len(fids)
        results.append({"row": row, **described, "fid": all_fids, "fid_mean": mean, "ckpt": args.ckpt, **key})
        cells = " | ".join(f"{f:.3f}{'*' if s in earlier else ''}" for s, f in fids.items())
        shown = ""
        if baseline:
            results[-1]["fid_over_baseline"] = mean / results[0]["fid_mean"]
            shown = f" {results[-1]['fid_over_baseline']:.2f}x |"
        print(
            f"| {row} | {described['nfe']:g} | {cells} | {mean:.3f} |{shown} {described['seconds_per_image']:.4f} |",
            flush=True,
        )
        if args.out:  # whole or not at all: a crash mid-write must not lose the rows already scored
            partial = Path(f"{args.out}.partial")
            partial.write_text(json.dumps(merge(stored, results), indent=2))
            os.replace(partial, args.out)
    if any_reused:
        print(f"\n*: taken from {args.out} (scored there with the same checkpoint, n and features)")
    return results


if __name__ == "__main__":
    main()
