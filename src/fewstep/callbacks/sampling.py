"""Callbacks that sample the model while it trains: image grids and sampling speed.

Sampling calls the networks directly (never the DDP wrapper), so it runs no collective and can
run on rank 0 alone while the other ranks wait at their next gradient all-reduce: no deadlock,
and one file per grid.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torchvision.utils import make_grid, save_image

from fewstep.lit.module import DiffusionModel


def _run_dir(trainer: L.Trainer, subdir: str) -> Path:
    return Path(trainer.default_root_dir) / subdir


def default_prompts(trainer: L.Trainer, count: int) -> list[str]:
    """``count`` distinct training captions, evenly spread over the training set (deterministic)."""
    captions = list(dict.fromkeys(trainer.datamodule.train_captions()))
    step = max(1, len(captions) // count)
    return captions[::step][:count]


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` optimizer steps and at the end of training: a PNG grid + a logged image.

    The same ``seed`` every time, so successive grids show the same noise becoming digits. A
    class-conditional model draws one row per class, a text model one row per prompt (``prompts``,
    default: a spread of training captions), also logged as a W&B table of images and prompts.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        num_samples: int = 64,
        seed: int = 0,
        sampler: dict | None = None,
        guidance: dict | None = None,
        prompts: list[str] | None = None,
        num_prompts: int = 8,
    ) -> None:
        self.every_n_steps, self.num_samples, self.seed = every_n_steps, num_samples, seed
        self.sampler, self.guidance = sampler, guidance
        self.prompts, self.num_prompts = (list(prompts) if prompts else None), num_prompts
        self._last_step = -1
        self._last_path: Path | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: DiffusionModel, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.log_grid(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: DiffusionModel) -> None:
        if trainer.global_step != self._last_step:
            self.log_grid(trainer, pl_module, final=True)
        elif trainer.is_global_zero and self._last_path is not None:  # the grid of this step exists already
            shutil.copyfile(self._last_path, self._last_path.parent / "final.png")

    def rows(self, trainer: L.Trainer, pl_module: DiffusionModel) -> tuple[dict[str, Any], list[str], int]:
        """The conditions of the grid's samples (one row per class / prompt), the row captions, the row length."""
        if "text" in pl_module.conditions:
            prompts = self.prompts or default_prompts(trainer, self.num_prompts)
            per_row = max(1, self.num_samples // len(prompts))
            return {"prompt": [p for p in prompts for _ in range(per_row)]}, prompts, per_row
        if pl_module.hparams.num_classes:
            classes = pl_module.hparams.num_classes
            per_row = max(1, self.num_samples // classes)
            labels = torch.arange(classes).repeat_interleave(per_row)
            return {"y": labels}, [f"class {k}" for k in range(classes)], per_row
        return {}, [], int(math.ceil(math.sqrt(self.num_samples)))

    def log_grid(self, trainer: L.Trainer, pl_module: DiffusionModel, final: bool = False) -> Path | None:
        self._last_step = trainer.global_step
        if not trainer.is_global_zero:
            return None
        condition, captions, per_row = self.rows(trainer, pl_module)
        count = len(next(iter(condition.values()))) if condition else self.num_samples
        images = pl_module.sample(count, self.sampler, seed=self.seed, guidance=self.guidance, **condition)
        images = (images.float().cpu() + 1) / 2
        grid = make_grid(images, nrow=per_row, padding=2, pad_value=1.0)
        out = _run_dir(trainer, "samples") / f"step_{trainer.global_step:07d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, out)
        self._last_path = out
        if final:
            shutil.copyfile(out, out.parent / "final.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples", [grid], step=trainer.global_step, caption=[f"step {trainer.global_step}"])
                if "prompt" in condition:
                    rows = [make_grid(images[i * per_row : (i + 1) * per_row]) for i in range(len(captions))]
                    logger.log_table(
                        "samples_by_prompt",
                        columns=["step", "prompt", "samples"],
                        data=[[trainer.global_step, p, _wandb_image(r)] for p, r in zip(captions, rows, strict=True)],
                        step=trainer.global_step,
                    )
        return out


def _wandb_image(image: torch.Tensor) -> Any:
    import wandb

    return wandb.Image(image)


class SamplingTime(L.Callback):
    """Times the configured sampler: seconds per image, NFE and images/s (logged and in ``sampling_time.json``).

    One warm-up batch first, so one-time costs (allocations, kernel selection) are not counted.
    Runs every ``every_n_steps`` (0 = only at the end of training).
    """

    def __init__(
        self, every_n_steps: int = 0, num_samples: int = 32, sampler: dict | None = None, guidance: dict | None = None
    ) -> None:
        self.every_n_steps, self.num_samples, self.sampler = every_n_steps, num_samples, sampler
        self.guidance = guidance

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: DiffusionModel, *args: Any) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: DiffusionModel) -> None:
        self.measure(trainer, pl_module)

    def measure(self, trainer: L.Trainer, pl_module: DiffusionModel) -> dict | None:
        if not trainer.is_global_zero:
            return None
        pl_module.sample(min(4, self.num_samples), self.sampler, steps=1, seed=0, guidance=self.guidance)  # warm-up
        result = pl_module.sample(
            self.num_samples, self.sampler, seed=0, guidance=self.guidance, return_result=True
        )  # conditional models: the null condition (guided with guidance.scale when that is not 1)
        spec = result.spec  # sampler=auto: the sampler it stood for
        figures = {
            "sampling/seconds_per_image": result.seconds / self.num_samples,
            "sampling/images_per_second": result.images_per_second,
            "sampling/nfe": float(result.nfe),
        }
        for logger in trainer.loggers:
            logger.log_metrics(figures, step=trainer.global_step)
        record = {
            "step": trainer.global_step,
            "sampler": spec.name,
            "steps": spec.steps,
            "spacing": spec.spacing,
            **figures,
        }
        path = _run_dir(trainer, "sampling_time.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2))
        return record
