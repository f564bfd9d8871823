"""GPU throughput of the real networks: training images/s (fp32, bf16-mixed, torch.compile), sampling images/s
at 10 NFE, peak memory, host syncs per training step. Prints markdown tables, writes JSON (``--out``).

    python benchmarks/gpu.py --out gpu.json                       # tiny U-Net: a few minutes on one GPU (2 compiles)
    python benchmarks/gpu.py --model small --out gpu_small.json   # conf/model/small.yaml (6.8 M parameters)
    python benchmarks/gpu.py --quick --out /tmp/gpu.json          # CPU smoke test: tiny batches, no compile

The network, schedule and loss are the repo's: conf/train.yaml composed with ``model=--model`` and
any extra Hydra overrides (e.g. ``module.prediction=v``), built by ``fewstep.train.build_model``.

Training: real Lightning optimizer steps (AdamW, gradient clipping, EMA) on random images of the
data's shape held in memory (no data loading), batch ``--batch`` (128), timed over ``--steps``
after ``--warmup`` steps, with a device sync only at the ends of the window. Modes: ``fp32``,
``bf16`` (``precision=bf16-mixed``), ``compile`` and ``compile-bf16`` (``torch.compile`` of the
network; its compile time, the warm-up's excess over steady steps, is reported apart). On CUDA,
``syncs/step`` counts the host-device synchronisations of a training step (Lightning's included)
with ``torch.cuda.set_sync_debug_mode``, over ``--sync-steps`` extra steps.

Sampling: ``dpmpp_2m`` (its conf/sampler options: karras spacing) with 10 steps = 10 NFE, EMA
network, fp32, one batch of each ``--sample-batch`` (256 and 1024), after a warm-up call.

torch's defaults hold: on CUDA "fp32" convolutions use TF32 (``cudnn.allow_tf32``), matmuls do not.

Peak memory: ``torch.cuda.max_memory_allocated`` per measurement; on CPU the process's peak RSS so
far (monotone: it only says the run fitted in that much).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, TensorDataset

from fewstep.config import CONFIG_DIR, register_resolvers
from fewstep.lit import DiffusionModel, ImageDataModule
from fewstep.precision import cpu_name
from fewstep.train import build_model

MODES = ("fp32", "bf16", "compile", "compile-bf16")


def load_config(model: str, overrides: list[str]) -> Any:
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=["data.root=data", f"model={model}", *overrides])


def new_model(cfg: Any, seed: int = 0) -> DiffusionModel:
    torch.manual_seed(seed)
    datamodule = ImageDataModule(**{k: v for k, v in cfg.data.items() if k not in ("_target_", "root")})
    return build_model(cfg, datamodule)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer(L.Callback):
    """Wall time of the warm-up steps and of the timed window; host syncs counted over the steps after it."""

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.begin = self.start = self.end = 0.0
        self.syncs: list[int] = []
        self._catcher: Any = None
        self._caught: list[warnings.WarningMessage] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync(self.device)
        self.begin = time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._stop_counting()  # a whole iteration, from one batch start to the next, Lightning's hooks included
        step = trainer.global_step
        if step == self.warmup:
            sync(self.device)
            self.start = time.perf_counter()
        elif step == self.warmup + self.steps:
            sync(self.device)
            self.end = time.perf_counter()
        if step >= self.warmup + self.steps and self.device.type == "cuda":
            self._catcher = warnings.catch_warnings(record=True)
            self._caught = self._catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def _stop_counting(self) -> None:
        if self._catcher is not None:
            torch.cuda.set_sync_debug_mode(0)
            self._catcher.__exit__(None, None, None)
            self.syncs.append(sum("synchronizing" in str(w.message) for w in self._caught))
            self._catcher = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_counting()
        if not self.end:
            sync(self.device)
            self.end = time.perf_counter()


def train_throughput(cfg: Any, mode: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model = new_model(cfg)
    if mode.startswith("compile"):
        model.net = torch.compile(model.net)
    hp = model.hparams
    n = args.batch * (args.warmup + args.steps + args.sync_steps)
    images = torch.rand(n, hp.channels, hp.image_size, hp.image_size) * 2 - 1
    labels = torch.randint(0, hp.num_classes or 10, (n,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=args.batch, shuffle=False)
    sync_steps = args.sync_steps if device.type == "cuda" else 0
    timer = Timer(args.warmup, args.steps, device)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if mode.endswith("bf16") else "32-true",
        max_steps=args.warmup + args.steps + sync_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        callbacks=[timer],
    )
    reset_peak(device)
    trainer.fit(model, train_dataloaders=loader)
    seconds = timer.end - timer.start
    step_s = seconds / args.steps
    return {
        "model": args.model,
        "mode": mode,
        "batch": args.batch,
        "images_per_s": args.batch * args.steps / seconds,
        "ms_per_step": 1000 * step_s,
        "compile_s": max(0.0, timer.start - timer.begin - args.warmup * step_s) if mode.startswith("compile") else None,
        "peak_memory_mb": peak_memory_mb(device),
        "syncs_per_step": sum(timer.syncs) / len(timer.syncs) if timer.syncs else None,
        "parameters": sum(p.numel() for p in model.net.parameters()),
    }


def sample_throughput(cfg: Any, batch: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model = new_model(cfg).to(device)
    model.sample(min(batch, 8), "dpmpp_2m", steps=args.nfe, seed=0, batch_size=batch)  # warm-up
    reset_peak(device)
    result = model.sample(batch, "dpmpp_2m", steps=args.nfe, seed=0, batch_size=batch, return_result=True)
    return {
        "model": args.model,
        "sampler": "dpmpp_2m",
        "batch": batch,
        "nfe": result.nfe,
        "images_per_s": result.images_per_second,
        "seconds": result.seconds,
        "peak_memory_mb": peak_memory_mb(device),
    }


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="conf/model option: tiny (default), small, base, dit_tiny")
    parser.add_argument("--batch", type=int, default=128, help="training batch")
    parser.add_argument("--steps", type=int, default=50, help="timed training steps per mode")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (they include compiling)")
    parser.add_argument("--sync-steps", type=int, default=5, help="steps after the timed ones whose syncs are counted")
    parser.add_argument(
        "--modes", nargs="+", choices=MODES, default=None, help="default: all (CPU --quick: no compile)"
    )
    parser.add_argument("--sample-batch", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--nfe", type=int, default=10, help="dpmpp_2m steps (1 NFE each)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: batch 8, 3 steps, sampling batches 8 16 (overrides those options)",
    )
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the train config, e.g. module.prediction=v")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick:
        args.batch, args.steps, args.warmup, args.sync_steps, args.sample_batch = 8, 3, 1, 1, [8, 16]
    modes = args.modes or [m for m in MODES if not (args.quick and device.type == "cpu" and "compile" in m)]

    cfg = load_config(args.model, args.overrides)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(
        f"# fewstep GPU benchmark: {name}, torch {torch.__version__}, model={args.model}, "
        f"{platform.python_version()}, {torch.get_num_threads()} CPU threads\n",
        flush=True,
    )
    train = []
    for mode in modes:
        train.append(train_throughput(cfg, mode, args, device))
        print(f"trained {mode}: {train[-1]['images_per_s']:.1f} images/s", flush=True)
    print(f"\n| training, batch {args.batch} | images/s | ms/step | compile s | peak MB | syncs/step |")
    print("|---|---|---|---|---|---|")
    for row in train:
        print(
            f"| {row['model']} {row['mode']} | {fmt(row['images_per_s'])} | {fmt(row['ms_per_step'], 2)} | "
            f"{fmt(row['compile_s'])} | {fmt(row['peak_memory_mb'], 0)} | {fmt(row['syncs_per_step'])} |"
        )
    sample = [sample_throughput(cfg, batch, args, device) for batch in args.sample_batch]
    print("\n| sampling dpmpp_2m, fp32 | batch | NFE | images/s | s | peak MB |\n|---|---|---|---|---|---|")
    for row in sample:
        print(
            f"| {row['model']} | {row['batch']} | {fmt(row['nfe'], 0)} | {fmt(row['images_per_s'])} | "
            f"{fmt(row['seconds'], 3)} | {fmt(row['peak_memory_mb'], 0)} |"
        )
    if device.type != "cuda":
        print("\n(peak MB on a CPU: the process's peak RSS so far)")
    if args.out:
        record = {
            "device": name,
            "torch": torch.__version__,
            "model": args.model,
            "overrides": args.overrides,
            "quick": args.quick,
            "train": train,
            "sample": sample,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
