"""DiffusionModel: the LightningModule that trains a U-Net denoiser and samples from it."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from fewstep.config import sampler_config
from fewstep.diffusion import PREDICTIONS, Denoiser, diffusion_loss, make_schedule
from fewstep.diffusion.sampling import OPTIMIZED, SampleResult, SamplerSpec, generate, optimized_sigmas
from fewstep.nn import UNet

DEFAULT_UNET = {
    "base_channels": 32,
    "channel_mult": [1, 2, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [8],
    "dropout": 0.1,
}
DEFAULT_SAMPLER = {"name": "ddim", "steps": 50, "spacing": "trailing", "eta": 0.0}
# What must agree between a checkpoint and the run that loads it (the rest may change on resume).
ARCHITECTURE_KEYS = ("image_size", "channels", "unet", "num_classes", "num_timesteps", "prediction")


def ema_with_warmup(decay: float) -> Callable[[list[Tensor], list[Tensor], Tensor | int], None]:
    """EMA update for ``AveragedModel``: decay ``min(decay, (1 + n) / (10 + n))`` after n updates.

    The warm-up keeps early, random weights from dominating the average of a short run (the
    schedule of Tensorflow's ExponentialMovingAverage with ``num_updates``).
    """

    @torch.no_grad()
    def update(ema_params: list[Tensor], params: list[Tensor], num_averaged: Tensor | int) -> None:
        n = float(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(ema_params, params, 1 - d)

    return update


class DiffusionModel(L.LightningModule):
    """A DDPM-style diffusion model: U-Net + noise schedule + MSE loss, with an EMA of the weights.

    The seed API works as written::

        model = DiffusionModel(image_size=64, beta_start=1e-4, beta_end=0.01, num_timesteps=1000)
        samples = model.sample(16)   # [16, C, 64, 64] in [-1, 1]

    Args:
        image_size, channels: the image shape the U-Net is built for.
        schedule: ``linear`` (beta_start, beta_end) or ``cosine`` (cosine_s); ``num_timesteps`` T.
        unet: keyword arguments of :class:`fewstep.nn.UNet` (the ``model`` config group).
        prediction: the training target, ``eps``, ``x0`` or ``v``.
        lr, weight_decay, adam_betas, warmup_steps: AdamW with a linear learning-rate warm-up.
        ema_decay: decay of the weight EMA (``None`` or 0 disables it).
        sampler: the default sampler config used by :meth:`sample` (``conf/sampler``).
        clip_x0: clamp the denoised estimate to ``[-clip_x0, clip_x0]`` while sampling.
        num_classes: train a class-conditional model (labels ``y``) with ``label_dropout`` for CFG.
        data: the data config the model was trained on (``conf/data``), kept for evaluation.
    """

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        num_timesteps: int = 1000,
        cosine_s: float = 0.008,
        unet: Mapping[str, Any] | None = None,
        prediction: str = "eps",
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 500,
        ema_decay: float | None = 0.999,
        sampler: Mapping[str, Any] | None = None,
        clip_x0: float | None = 1.0,
        num_classes: int | None = None,
        label_dropout: float = 0.1,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown module.prediction={prediction!r}; choose one of: {', '.join(PREDICTIONS)}")
        unet = {**DEFAULT_UNET, **dict(unet or {})}
        sampler = dict(sampler) if sampler and "name" in sampler else {**DEFAULT_SAMPLER, **dict(sampler or {})}
        self.save_hyperparameters(
            {
                "image_size": image_size,
                "channels": channels,
                "schedule": schedule,
                "beta_start": beta_start,
                "beta_end": beta_end,
                "num_timesteps": num_timesteps,
                "cosine_s": cosine_s,
                "unet": _plain(unet),
                "prediction": prediction,
                "lr": lr,
                "weight_decay": weight_decay,
                "adam_betas": list(adam_betas),
                "warmup_steps": warmup_steps,
                "ema_decay": ema_decay,
                "sampler": _plain(sampler),
                "clip_x0": clip_x0,
                "num_classes": num_classes,
                "label_dropout": label_dropout,
                "data": _plain(dict(data)) if data else None,
            }
        )
        if schedule == "linear":
            self.schedule = make_schedule(
                "linear", beta_start=beta_start, beta_end=beta_end, num_timesteps=num_timesteps
            )
        elif schedule == "cosine":
            self.schedule = make_schedule("cosine", num_timesteps=num_timesteps, s=cosine_s)
        else:
            self.schedule = make_schedule(schedule)  # raises with the list of valid names
        SamplerSpec.from_config(sampler)  # validate the sampler config now, not after training
        self.net = UNet(image_size=image_size, in_channels=channels, num_classes=num_classes, **unet)
        self.ema: AveragedModel | None = None
        if ema_decay:
            if not 0 < ema_decay < 1:
                raise ValueError(f"module.ema_decay must be in (0, 1) or null, got {ema_decay}")
            self.ema = AveragedModel(self.net, multi_avg_fn=ema_with_warmup(ema_decay), use_buffers=True)
            self.ema.requires_grad_(False)
        # Set by load_model: where optimized grids of this checkpoint are cached, and its identity.
        self.sigmas_cache: Path | None = None
        self.checkpoint_id: str | None = None
        self._optimized: dict[str, Tensor] = {}

    # ----------------------------------------------------------------------------- training
    def _labels(self, batch: Any) -> dict:
        if not self.hparams.num_classes:
            return {}
        y = batch[1].long()
        # Classifier-free guidance training: drop labels to the null token (Ho & Salimans 2022).
        drop = torch.rand(y.shape, device=y.device) < self.hparams.label_dropout
        return {"y": torch.where(drop, torch.full_like(y, self.hparams.num_classes), y)}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x0 = batch[0]
        loss = diffusion_loss(self.net, self.schedule, x0, self.hparams.prediction, **self._labels(batch))
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the training loss became {loss.item()} at step {self.global_step}: lower module.lr "
                f"(now {self.hparams.lr}), keep trainer.gradient_clip_val set, or train in precision=32"
            )
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(x0))
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Right after the weights change, before any callback (checkpoint, sample grid) looks at them.
        if self.ema is not None:
            self.ema.update_parameters(self.net)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        # A fixed generator makes the validation loss comparable across epochs.
        generator = torch.Generator(self.device).manual_seed(batch_idx)
        net = self.sampling_net()
        loss = diffusion_loss(net, self.schedule, batch[0], self.hparams.prediction, generator=generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch[0]))

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            self.net.parameters(), lr=hp.lr, betas=tuple(hp.adam_betas), weight_decay=hp.weight_decay
        )
        warmup = max(1, int(hp.warmup_steps))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # RNG state so that a resumed run draws the same t / noise as an uninterrupted one would.
        # Stored as tensors and plain lists: the checkpoint stays loadable with weights_only=True.
        np_state = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": _plain(random.getstate()),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_architecture(checkpoint.get("hyper_parameters", {}), dict(self.hparams))
        # Resuming a fit (not a plain load_from_checkpoint): restore the RNGs now, before the
        # data loaders are iterated, which is where the uninterrupted run was when it saved.
        if self._trainer is not None and checkpoint.get("rng_states"):
            restore_rng_states(checkpoint["rng_states"])

    # ----------------------------------------------------------------------------- sampling
    def sampling_net(self) -> nn.Module:
        """The EMA network when there is one, else the trained one."""
        return self.ema.module if self.ema is not None else self.net

    def denoiser(self, use_ema: bool = True) -> Denoiser:
        net = self.sampling_net() if use_ema else self.net
        return Denoiser(net, self.schedule, self.hparams.prediction, clip_x0=self.hparams.clip_x0)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        sampler: str | Mapping[str, Any] | None = None,
        steps: int | None = None,
        spacing: str | None = None,
        *,
        generator: torch.Generator | None = None,
        batch_size: int = 256,
        y: Tensor | None = None,
        use_ema: bool = True,
        return_result: bool = False,
        progress: Callable[[int], None] | None = None,
        **options: Any,
    ) -> Tensor | SampleResult:
        """Draw ``num_samples`` images in [-1, 1] with the EMA weights (when there are any).

        ``sampler`` is a name (``"ddim"``: the config of ``conf/sampler/ddim.yaml``, or the run's
        own when it trained with that sampler) or a full sampler config; ``steps``, ``spacing`` and
        ``options`` (e.g. ``eta=0.5``) override it. With ``return_result`` the NFE and wall time
        come back too.
        """
        if isinstance(sampler, str):  # the run's own config for its sampler, else conf/sampler/NAME.yaml
            same = sampler == self.hparams.sampler.get("name")
            base = dict(self.hparams.sampler) if same else sampler_config(sampler)
        else:
            base = dict(sampler or self.hparams.sampler)
        spec = SamplerSpec.from_config(base, steps=steps, spacing=spacing, **options)
        if self.hparams.num_classes and y is not None:
            y = y.to(self.device).long()
        was_training = self.training
        self.eval()
        try:
            sigmas = self.optimized_sigmas(spec, use_ema) if spec.spacing == OPTIMIZED else None
            result = generate(
                self.denoiser(use_ema),
                self.schedule,
                spec,
                (self.hparams.channels, self.hparams.image_size, self.hparams.image_size),
                num_samples,
                batch_size=batch_size,
                generator=generator,
                device=self.device,
                cond={"y": y} if y is not None else None,
                progress=progress,
                to_cpu=False,
                sigmas=sigmas,
            )
        finally:
            self.train(was_training)
        result.images = result.images.clamp(-1, 1)
        return result if return_result else result.images

    def optimized_sigmas(self, spec: SamplerSpec, use_ema: bool = True) -> Tensor:
        """The ``optimized`` grid for this model and sampler: cached beside the checkpoint it was
        loaded from (keyed by the file's hash), or in memory for the current training step."""
        shape = (self.hparams.channels, self.hparams.image_size, self.hparams.image_size)
        weights = self.checkpoint_id or f"step-{self.global_step}"
        key = {"weights": weights, "ema": bool(use_ema and self.ema is not None)}
        memo = json.dumps(
            [key, spec.name, spec.steps, spec.options, spec.spacing_options, spec.dynamic_threshold],
            sort_keys=True,
            default=str,
        )
        if memo not in self._optimized:
            if len(self._optimized) > 32:
                self._optimized.clear()
            self._optimized[memo] = optimized_sigmas(
                self.denoiser(use_ema),
                self.schedule,
                spec,
                shape,
                device=self.device,
                cache_path=self.sigmas_cache if self.checkpoint_id else None,
                cache_key=key,
            )
        return self._optimized[memo]


def restore_rng_states(state: Mapping[str, Any]) -> None:
    """Inverse of the ``rng_states`` that :meth:`DiffusionModel.on_save_checkpoint` stores."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))


def check_architecture(saved: Mapping[str, Any], current: Mapping[str, Any], path: str = "the checkpoint") -> None:
    """One clear error when a checkpoint was trained with another network or data shape."""
    diffs = [
        f"{k}={saved.get(k)!r} (this run: {current.get(k)!r})"
        for k in ARCHITECTURE_KEYS
        if _plain(saved.get(k)) != _plain(current.get(k))
    ]
    if diffs:
        raise ValueError(
            f"{path} was trained with another architecture: {'; '.join(diffs)}. "
            "Use the same model=/data= options as the run that wrote it, or start a new run without ckpt_path"
        )


def _plain(value: Any) -> Any:
    """Containers as plain dicts/lists of primitives (safe for weights_only checkpoint loading)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
