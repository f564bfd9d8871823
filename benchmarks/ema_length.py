"""How long should the weight EMA be? One training run keeps several EMAs side by side, then each is scored
with FID.

    python benchmarks/ema_length.py                                   # make train's run + 6 EMAs (~35 min, 2 cores)
    python benchmarks/ema_length.py seed=1 --decays 0.999 --sigma-rels 0.05     # another seed, two EMAs
    python benchmarks/ema_length.py module.lr_decay=constant          # make train's run at a constant rate
    python benchmarks/ema_length.py trainer.max_steps=300 --sigma-rels 0.05 0.1 --decays 0.999 --n 1000

(Hydra overrides before the options: a list option would take them as its values.)

``train.py`` runs with the given overrides plus the :class:`EMAProfiles` callback, which updates one extra
EMA per profile after every optimizer step, exactly as ``DiffusionModel`` updates its own, and saves the
run's checkpoint once per profile with that average in place of the module's EMA. An EMA never feeds back
into training, so each profile's checkpoint is the one a run with that ``module.ema_decay`` /
``module.ema_sigma_rel`` would have ended with (same seed, same steps): one run compares them all, where
separate runs would add seed noise. The raw weights (no EMA) are scored too.

Profiles: ``--decays`` (the exponential EMA with warm-up, ``module.ema_decay``) and ``--sigma-rels``
(EDM2's power-function EMA, ``module.ema_sigma_rel``; Karras et al. 2024). Score: FID of ``--n`` samples,
``dpmpp_2m`` on Karras sigmas at 10 NFE, the classifier features of ``sample.py eval=true``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]


class EMAProfiles(L.Callback):
    """Extra EMAs of the network, one per profile, saved at the end as one checkpoint each."""

    def __init__(self, out_dir: str, decays: list[float] = (), sigma_rels: list[float] = ()) -> None:
        self.out_dir = Path(out_dir)
        self.options = {f"decay_{d}": {"decay": float(d)} for d in decays}
        self.options |= {f"sigma_rel_{s}": {"sigma_rel": float(s)} for s in sigma_rels}
        self.emas: dict[str, Any] = {}
        self.updated_at = 0  # the optimizer step of the last update

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        from fewstep.lit.module import EMA

        if pl_module.ema is None:
            raise ValueError("EMAProfiles swaps the module's EMA: train with module.ema_decay or module.ema_sigma_rel")
        self.emas = {name: EMA(pl_module.net, **kw).requires_grad_(False) for name, kw in self.options.items()}
        self.updated_at = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        # After the optimizer step and the module's own EMA update, so the same weights are averaged; only
        # on batches that stepped (with gradient accumulation the others leave the weights as they were).
        if trainer.global_step == self.updated_at:
            return
        self.updated_at = trainer.global_step
        for ema in self.emas.values():
            ema.update_parameters(pl_module.net)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        own = {k: v.clone() for k, v in pl_module.ema.state_dict().items()}
        for name, ema in self.emas.items():
            pl_module.ema.load_state_dict(ema.state_dict())
            trainer.save_checkpoint(self.out_dir / f"{name}.ckpt", weights_only=False)
        pl_module.ema.load_state_dict(own)


def hydra_list(values: list[float]) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


def fid(ckpt: Path, out_dir: Path, n: int, ema: bool) -> float:
    command = [
        sys.executable,
        str(ROOT / "sample.py"),
        f"ckpt={ckpt}",
        "sampler=dpmpp_2m",
        "sampler.spacing=karras",
        "sampler.steps=10",
        f"n={n}",
        f"ema={str(ema).lower()}",
        "eval=true",
        "save_npz=false",
        f"out_dir={out_dir}",
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"sample.py failed on {ckpt}:\n{proc.stderr[-2000:]}")
    return float(json.loads((out_dir / "summary.json").read_text())["fid"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decays", type=float, nargs="*", default=[0.999, 0.995])
    parser.add_argument("--sigma-rels", type=float, nargs="*", default=[0.025, 0.05, 0.1, 0.2])
    parser.add_argument("--n", type=int, default=2000, help="FID samples per profile")
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "ema_length" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for train.py, e.g. trainer.max_steps=2000")
    args = parser.parse_intermixed_args()

    profiles = args.out / "profiles"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        f"hydra.run.dir={args.out / 'run'}",
        "+callbacks.ema_profiles._target_=ema_length.EMAProfiles",
        f"+callbacks.ema_profiles.out_dir={profiles}",
        f"+callbacks.ema_profiles.decays={hydra_list(args.decays)}",
        f"+callbacks.ema_profiles.sigma_rels={hydra_list(args.sigma_rels)}",
        *args.overrides,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, env=env)
    train_minutes = (time.perf_counter() - start) / 60

    last = args.out / "run" / "checkpoints" / "last.ckpt"
    rows = [("raw weights (no EMA)", fid(last, args.out / "fid" / "raw", args.n, ema=False))]
    for ckpt in sorted(profiles.glob("*.ckpt")):
        rows.append((ckpt.stem, fid(ckpt, args.out / "fid" / ckpt.stem, args.n, ema=True)))
        print(f"{rows[-1][0]}: FID {rows[-1][1]:.2f}", flush=True)
    result = {"overrides": args.overrides, "train_minutes": train_minutes, "n": args.n, "fid": dict(rows)}
    (args.out / "ema_length.json").write_text(json.dumps(result, indent=2))
    print(f"\ntraining: {train_minutes:.1f} min ({' '.join(args.overrides) or 'defaults'}); torch {torch.__version__}")
    print(f"| EMA | FID ({args.n} samples, dpmpp_2m Karras 10 NFE) |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value:.2f} |")


if __name__ == "__main__":
    main()
