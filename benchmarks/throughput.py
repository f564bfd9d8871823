"""Training and sampling throughput of the default config on this machine (prints markdown tables).

    python benchmarks/throughput.py [--train-steps 60] [--n 64] [--steps 10 20 50] [--samplers ddim ...]
    python benchmarks/throughput.py --train-steps 0 --samplers --batch-sizes 16 32 64 128 256   # batch only

Training: images/s of real Lightning optimizer steps (default data, model, schedule; loggers and
callbacks off), timed after a warm-up. Sampling: images/s of each sampler (its conf/sampler
options, ``steps`` overridden) at each step count, with its NFE, the EMA network, one batch of
``--n`` images, after a warm-up call. ``ode_rk45`` is timed once: its tolerance sets its NFE.
Sampling batch (``--batch-sizes``): images/s of ``--batch-images`` images drawn through
``DiffusionModel.sample_batches`` (what sample.py and the FID callback run) ``B`` at a time, with
``sampler=auto`` at 10 steps; the batch sizes take turns, ``--rounds`` times, and the best round counts.
"""

from __future__ import annotations

import argparse
import platform
import time

import lightning as L
import torch
from hydra import compose, initialize_config_dir

from fewstep.config import CONFIG_DIR, register_resolvers
from fewstep.lit import DiffusionModel, ImageDataModule
from fewstep.samplers import SAMPLERS
from fewstep.train import build_model, resolve_trainer_precision


class StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.images = warmup, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        if trainer.global_step >= self.warmup:
            self.images += len(batch[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--n", type=int, default=64, help="images per sampling measurement")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--samplers", nargs="*", default=sorted(SAMPLERS), help="none: skip the sampler table")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[], help="sampling batch sizes to compare")
    parser.add_argument("--batch-images", type=int, default=256, help="images per batch-size measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the train config, e.g. model=small")
    args = parser.parse_args()

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["data.root=data", *args.overrides])
    datamodule = ImageDataModule(**{k: v for k, v in cfg.data.items() if k not in ("_target_", "root")})
    model = build_model(cfg, datamodule)
    precision = resolve_trainer_precision(cfg, model)  # trainer.precision=auto: as train.py would train
    print(
        f"# fewstep throughput: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, model={cfg.model}, batch={cfg.data.batch_size}, precision={precision}\n"
    )

    warmup = 5
    timer = StepTimer(warmup)
    trainer = L.Trainer(
        max_steps=warmup + args.train_steps,
        accelerator=cfg.trainer.accelerator,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        limit_val_batches=0,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
    )
    if args.train_steps > 0:
        trainer.fit(model, datamodule=datamodule)
        seconds = time.perf_counter() - timer.start
        print("| training | images/s | s/step |\n|---|---|---|")
        print(
            f"| {cfg.data.name}, batch {cfg.data.batch_size} | {timer.images / seconds:.1f} | "
            f"{seconds / args.train_steps:.3f} |\n"
        )

    model.eval()
    if args.samplers:
        print("| sampler | steps | NFE | images/s | s/image |\n|---|---|---|---|---|")
    for name in args.samplers:
        for steps in args.steps[:1] if name == "ode_rk45" else args.steps:  # its tolerance sets the NFE
            options = {"steps": steps}
            model.sample(2, name, **options)  # warm-up
            result = model.sample(
                args.n, name, generator=torch.Generator().manual_seed(0), return_result=True, **options
            )
            print(
                f"| {name} | {steps} | {result.nfe} | {result.images_per_second:.1f} | {result.seconds / args.n:.4f} |",
                flush=True,
            )
    if args.batch_sizes:
        sampling_batch_table(model, args.batch_sizes, args.batch_images, args.rounds)


def sampling_batch_table(model: DiffusionModel, batch_sizes: list[int], images: int, rounds: int) -> None:
    """Images/s of ``sample_batches`` at each batch size, the sizes taking turns (the best round counts)."""
    model.sample(2, "auto", steps=10)  # warm-up
    best = dict.fromkeys(batch_sizes, 0.0)
    for _ in range(rounds):
        for batch in batch_sizes:
            start = time.perf_counter()
            for _result in model.sample_batches(images, "auto", steps=10, seed=0, batch_size=batch):
                pass
            best[batch] = max(best[batch], images / (time.perf_counter() - start))
    fastest = max(best.values())
    print(f"\n| sampling batch ({images} images, sampler=auto, 10 NFE) | images/s | vs the fastest |\n|---|---|---|")
    for batch, rate in best.items():
        print(f"| {batch} | {rate:.1f} | {rate / fastest:.2f} |", flush=True)


if __name__ == "__main__":
    main()
