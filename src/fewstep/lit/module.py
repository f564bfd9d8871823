"""DiffusionModel: the LightningModule that trains a denoising network (with its conditions) and samples it."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import json
import logging
import math
import random
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from fewstep.config import sampler_config
from fewstep.diffusion import Denoiser, Parameterisation, make_schedule
from fewstep.diffusion.sampling import (
    MODEL_SPACINGS,
    Guidance,
    SampleResult,
    SamplerSpec,
    collect,
    iter_generate,
    learned_coefficients,
    learned_start,
    optimized_sigmas,
    search_top,
)
from fewstep.distill.training import Distiller, check_distillation
from fewstep.samplers.learned import start_candidates

log = logging.getLogger(__name__)
DEFAULT_NET = {
    "_target_": "fewstep.nn.UNet",
    "base_channels": 32,
    "channel_mult": [1, 2, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [8],
    "dropout": 0.1,
}
DEFAULT_SAMPLER = {"name": "ddim", "steps": 50, "spacing": "trailing", "eta": 0.0}
NO_GUIDANCE = {"name": "none", "scale": 1.0, "sigma_min": None, "sigma_max": None}
# What must agree between a checkpoint and the run that loads it (the rest may change on resume).
ARCHITECTURE_KEYS = ("image_size", "channels", "net", "num_classes", "text_encoder", "num_timesteps", "prediction")
# Steps between host checks of the training loss on accelerators when module.nan_check_every is null.
NAN_CHECK_EVERY = 50
LR_DECAYS = ("constant", "cosine", "linear")
# sigma_rel of gamma = 0 (a plain running mean): longer averages need gamma < 0, which EDM2 leaves out.
POWER_EMA_MAX_SIGMA_REL = 1 / (2 * 3**0.5)


def lr_factor(step: int, *, warmup: int, decay: str, total: int) -> float:
    """The learning rate at optimizer step ``step`` as a fraction of ``module.lr``: a linear warm-up over
    ``warmup`` steps, then constant or a cosine (Loshchilov & Hutter 2017, SGDR without restarts) or linear
    decay that reaches zero at step ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress


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


def power_ema(sigma_rel: float) -> Callable[[list[Tensor], list[Tensor], Tensor | int], None]:
    """EMA update for ``AveragedModel``: EDM2's power-function EMA (Karras et al. 2024, Eq. 3-4).

    After n updates the next one averages with decay ``(1 - 1/(n+1)) ** (gamma + 1)``, so the average
    weighs the weights of training step tau by ``tau ** gamma``: its length is a fixed fraction of the
    run so far (relative standard deviation ``sigma_rel``) and suits runs of any length, where a fixed
    decay averages over too long a stretch of a short run and too short a stretch of a long one.
    """
    gamma = power_ema_gamma(sigma_rel)

    @torch.no_grad()
    def update(ema_params: list[Tensor], params: list[Tensor], num_averaged: Tensor | int) -> None:
        n = float(num_averaged)
        torch._foreach_lerp_(ema_params, params, 1 - (n / (n + 1)) ** (gamma + 1))

    return update


def power_ema_gamma(sigma_rel: float) -> float:
    """The exponent gamma of a power-function EMA of relative standard deviation ``sigma_rel``: the root of
    ``sigma_rel**2 = (gamma+1) / ((gamma+2)**2 (gamma+3))`` (EDM2, Eq. 4), a cubic in gamma."""
    if not 0 < sigma_rel < POWER_EMA_MAX_SIGMA_REL:
        raise ValueError(f"module.ema_sigma_rel must be in (0, {POWER_EMA_MAX_SIGMA_REL:.3f}), got {sigma_rel}")
    t = sigma_rel**-2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


class EMA(AveragedModel):
    """``AveragedModel`` with :func:`ema_with_warmup` (or :func:`power_ema` for ``sigma_rel``) that counts
    its updates on the host.

    torch's ``update_parameters`` reads the ``n_averaged`` buffer (on the model's device) twice per
    call and the warm-up read it once more: three host-device syncs per step on a GPU. Here the
    count lives in a Python int (read from the buffer once after a checkpoint load); the buffer is
    still incremented and saved, so checkpoints are the same as ``AveragedModel``'s.
    """

    def __init__(self, module: nn.Module, decay: float | None = None, sigma_rel: float | None = None) -> None:
        if (decay is None) == (sigma_rel is None):
            raise ValueError("EMA takes a decay or a sigma_rel, one of them")
        update = power_ema(sigma_rel) if sigma_rel is not None else ema_with_warmup(decay)
        super().__init__(module, multi_avg_fn=update, use_buffers=True)
        self._count: int | None = 0

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        if self._count is None:
            self._count = int(self.n_averaged)
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [*model.parameters(), *model.buffers()]
        current = [p.detach().to(a.device) for a, p in zip(averaged, current, strict=True)]
        if self._count == 0:
            torch._foreach_copy_(averaged, current)
        else:
            self.multi_avg_fn(averaged, current, self._count)
        self.n_averaged += 1
        self._count += 1

    def restart(self) -> None:
        """Start averaging afresh: the next update copies the weights (the warm-up begins again)."""
        self.n_averaged.zero_()
        self._count = 0

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._count = None  # the loaded n_averaged holds the count
        super()._load_from_state_dict(*args, **kwargs)


def build_module(config: Mapping[str, Any], what: str, **fixed: Any) -> nn.Module:
    """Instantiate the ``nn.Module`` that ``config["_target_"]`` names with the config's keys and ``fixed``.

    Unlike a bare ``hydra.utils.instantiate`` this refuses any target that is not an ``nn.Module``
    class (a checkpoint's hyper-parameters name it, and loading a checkpoint must never call
    arbitrary functions), and reports bad options in one line.
    """
    options = dict(config)
    target = options.pop("_target_", None)
    if not isinstance(target, str):
        raise ValueError(f"the {what} config needs a _target_ naming an nn.Module class (e.g. fewstep.nn.UNet)")
    module_name, _, attribute = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, ValueError, AttributeError) as err:
        raise ValueError(f"{what} _target_={target!r} cannot be imported ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{what} _target_={target!r} is not an nn.Module class")
    try:
        return cls(**options, **fixed)
    except TypeError as err:
        raise ValueError(f"bad options for {what} {target}: {err}") from None


class DiffusionModel(L.LightningModule):
    """A diffusion model made of swappable parts: network + schedule + parameterisation (+ text encoder).

    The seed API works as written::

        model = DiffusionModel(image_size=64, beta_start=1e-4, beta_end=0.01, num_timesteps=1000)
        samples = model.sample(16)   # [16, C, 64, 64] in [-1, 1]

    Args:
        image_size, channels: the image shape the network is built for.
        schedule: ``linear`` (beta_start, beta_end) or ``cosine`` (cosine_s); ``num_timesteps`` T.
        net: the network config (the ``model`` group's ``net`` node): ``_target_`` names any
            ``nn.Module`` with the signature ``net(x, t, *, y=None, context=None, context_mask=None,
            pooled=None)`` and the keyword arguments ``image_size, in_channels, num_classes, context_dim``.
        unet: U-Net options (older checkpoints and the seed API): the same as ``net`` with fewstep's UNet.
        prediction, loss_weighting, min_snr_gamma, noise_levels, log_normal_mean, log_normal_std, sigma_data:
            the :class:`Parameterisation`: eps / x0 / v / EDM's preconditioning, min-SNR weighting, uniform
            timesteps or EDM's log-normal noise levels.
        lr, weight_decay, adam_betas, warmup_steps: AdamW with a linear learning-rate warm-up.
        lr_decay: the learning rate after the warm-up: ``constant``, or ``cosine`` / ``linear`` decay to
            zero at the last step (``lr_decay_steps``, by default the trainer's total steps). Annealing
            lets the last steps settle instead of hopping around at the full step size.
        ema_decay: decay of the weight EMA (``None`` or 0 disables it), with a warm-up.
        ema_sigma_rel: instead of ``ema_decay``, EDM2's power-function EMA (Karras et al. 2024) whose
            length is this fraction of the run so far (relative standard deviation; EDM2 used 0.05-0.15).
        sampler: the default sampler config used by :meth:`sample` (``conf/sampler``).
        guidance: the default guidance config (``conf/guidance``) of :meth:`sample` and the callbacks.
        clip_x0: clamp the denoised estimate to ``[-clip_x0, clip_x0]`` while sampling.
        num_classes: train a class-conditional model (labels ``y``).
        text_encoder: a text encoder config (``conf/text_encoder``): train a text-conditional model
            on the batches' captions.
        cond_dropout: probability of replacing a condition by the null one (label ``num_classes``,
            the empty prompt) in training, for classifier-free guidance (Ho & Salimans 2022).
        data: the data config the model was trained on (``conf/data``), kept for evaluation.
        distillation: train a few-step student of a teacher checkpoint instead of a diffusion model
            (:mod:`fewstep.distill`): ``method`` progressive | consistency | consistency_training, ``teacher``,
            the method's options. Its default sampler is the student's (DDIM at its steps, consistency).
        nan_check_every: steps between the host checks of the training loss (1: every step); ``None``:
            every step on a CPU (free there), every ``NAN_CHECK_EVERY`` steps on accelerators, where a
            check waits for the device. A non-finite loss in between is recorded on the device and
            still stops the run before any checkpoint is written (see :meth:`check_finite`).
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
        net: Mapping[str, Any] | None = None,
        unet: Mapping[str, Any] | None = None,
        prediction: str = "eps",
        loss_weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        noise_levels: str = "uniform",
        log_normal_mean: float = -1.2,
        log_normal_std: float = 1.2,
        sigma_data: float = 0.5,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 500,
        lr_decay: str = "constant",
        lr_decay_steps: int | None = None,
        ema_decay: float | None = 0.999,
        ema_sigma_rel: float | None = None,
        sampler: Mapping[str, Any] | None = None,
        guidance: Mapping[str, Any] | None = None,
        clip_x0: float | None = 1.0,
        num_classes: int | None = None,
        text_encoder: Mapping[str, Any] | None = None,
        cond_dropout: float = 0.1,
        label_dropout: float | None = None,
        data: Mapping[str, Any] | None = None,
        distillation: Mapping[str, Any] | None = None,
        nan_check_every: int | None = None,
    ) -> None:
        super().__init__()
        if net is not None and unet is not None:
            raise ValueError("give the network as net (a _target_ config) or unet (U-Net options), not both")
        net = _plain(dict(net)) if net is not None else {**DEFAULT_NET, **_plain(dict(unet or {}))}
        distillation = check_distillation(_plain(dict(distillation))) if distillation else None
        if sampler is None and distillation is not None:
            sampler = Distiller.student_sampler(distillation)
        sampler = dict(sampler) if sampler and "name" in sampler else {**DEFAULT_SAMPLER, **dict(sampler or {})}
        guidance = {**NO_GUIDANCE, **dict(guidance or {})}
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"module.num_classes must be an integer >= 2 or null, got {num_classes!r}")
        cond_dropout = cond_dropout if label_dropout is None else label_dropout  # older checkpoints' name
        if not 0 <= cond_dropout < 1:
            raise ValueError(f"module.cond_dropout must be in [0, 1), got {cond_dropout}")
        if lr_decay not in LR_DECAYS:
            raise ValueError(f"module.lr_decay must be one of {', '.join(LR_DECAYS)}, got {lr_decay!r}")
        if lr_decay_steps is not None and (not isinstance(lr_decay_steps, int) or lr_decay_steps < 1):
            raise ValueError(f"module.lr_decay_steps must be an integer >= 1 or null, got {lr_decay_steps!r}")
        if nan_check_every is not None and (not isinstance(nan_check_every, int) or nan_check_every < 1):
            raise ValueError(f"module.nan_check_every must be an integer >= 1 or null, got {nan_check_every!r}")
        self.save_hyperparameters(
            {
                "image_size": image_size,
                "channels": channels,
                "schedule": schedule,
                "beta_start": beta_start,
                "beta_end": beta_end,
                "num_timesteps": num_timesteps,
                "cosine_s": cosine_s,
                "net": net,
                "prediction": prediction,
                "loss_weighting": loss_weighting,
                "min_snr_gamma": min_snr_gamma,
                "noise_levels": noise_levels,
                "log_normal_mean": log_normal_mean,
                "log_normal_std": log_normal_std,
                "sigma_data": sigma_data,
                "lr": lr,
                "weight_decay": weight_decay,
                "adam_betas": list(adam_betas),
                "warmup_steps": warmup_steps,
                "lr_decay": lr_decay,
                "lr_decay_steps": lr_decay_steps,
                "ema_decay": ema_decay,
                "ema_sigma_rel": ema_sigma_rel,
                "sampler": _plain(sampler),
                "guidance": _plain(guidance),
                "clip_x0": clip_x0,
                "num_classes": num_classes,
                "text_encoder": _plain(dict(text_encoder)) if text_encoder else None,
                "cond_dropout": cond_dropout,
                "data": _plain(dict(data)) if data else None,
                "distillation": distillation,
                "nan_check_every": nan_check_every,
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
        try:
            self.parameterisation = Parameterisation(
                self.schedule,
                prediction,
                loss_weighting,
                min_snr_gamma,
                noise_levels=noise_levels,
                log_normal_mean=log_normal_mean,
                log_normal_std=log_normal_std,
                sigma_data=sigma_data,
            )
        except ValueError as err:
            raise ValueError(f"module.{err}") from None
        SamplerSpec.from_config(sampler)  # validate the sampler config now, not after training
        self.text_encoder: nn.Module | None = build_module(text_encoder, "text_encoder") if text_encoder else None
        if distillation is not None and self.text_encoder is not None:
            # a student reads prompts with its teacher's (copied, frozen) encoder: both see the same condition
            self.text_encoder.requires_grad_(False)
        context_dim = int(self.text_encoder.dim) if self.text_encoder is not None else None
        self.net = build_module(
            net,
            "model.net",
            image_size=image_size,
            in_channels=channels,
            num_classes=num_classes,
            context_dim=context_dim,
        )
        self.ema: EMA | None = None
        self.ema_text: EMA | None = None
        if ema_sigma_rel is not None:
            ema_options = {"sigma_rel": ema_sigma_rel}
        elif ema_decay:
            if not 0 < ema_decay < 1:
                raise ValueError(f"module.ema_decay must be in (0, 1) or null, got {ema_decay}")
            ema_options = {"decay": ema_decay}
        else:
            ema_options = None
        if ema_options is not None:
            self.ema = EMA(self.net, **ema_options)
            self.ema.requires_grad_(False)
            if self.trains_text_encoder:
                self.ema_text = EMA(self.text_encoder, **ema_options)
                self.ema_text.requires_grad_(False)
        self.distiller = Distiller(distillation, self.schedule, self.parameterisation) if distillation else None
        if self.distiller is not None and self.distiller.method != "progressive":
            # the target network of consistency distillation: an EMA of the student, saved with it
            self.target_net = copy.deepcopy(self.net).requires_grad_(False)
        # Set by load_model: where optimized grids of this checkpoint are cached, and its identity.
        self.sigmas_cache: Path | None = None
        self.checkpoint_id: str | None = None
        self._optimized: dict[str, Any] = {}  # optimized grids and learned coefficients, per weights
        # [first step with a non-finite training loss (-1: none yet), that loss], kept on the loss's device
        self._nonfinite: Tensor | None = None

    @property
    def trains_text_encoder(self) -> bool:
        return self.text_encoder is not None and any(p.requires_grad for p in self.text_encoder.parameters())

    @property
    def conditions(self) -> tuple[str, ...]:
        """The conditions this model was trained with: ``label`` and/or ``text``."""
        return (("label",) if self.hparams.num_classes else ()) + (("text",) if self.text_encoder is not None else ())

    # --------------------------------------------------------------------------- conditions
    def condition_from_batch(self, batch: Any, dropout: float = 0.0, use_ema: bool = False) -> dict[str, Tensor]:
        """The ``cond`` mapping of a batch ``(images, labels[, captions])`` for the network.

        With ``dropout`` each condition is replaced by the null one with that probability: the
        training of classifier-free guidance (Ho & Salimans 2022, Algorithm 1).
        """
        cond: dict[str, Tensor] = {}
        if self.hparams.num_classes:
            y = batch[1].long()
            if dropout:
                drop = torch.rand(y.shape, device=y.device) < dropout
                y = torch.where(drop, torch.full_like(y, self.hparams.num_classes), y)
            cond["y"] = y
        if self.text_encoder is not None:
            if len(batch) < 3:
                raise ValueError("a text-conditional model needs captioned data (e.g. data=mnist5k_captions)")
            prompts = list(batch[2])
            if dropout:
                drop = torch.rand(len(prompts)).tolist()
                prompts = ["" if d < dropout else p for d, p in zip(drop, prompts, strict=True)]
            cond.update(self.encode_text(prompts, use_ema))
        return cond

    def encode_text(self, prompts: list[str], use_ema: bool = True) -> dict[str, Tensor]:
        encoder = self.ema_text.module if use_ema and self.ema_text is not None else self.text_encoder
        return dict(encoder(list(prompts)))

    def condition(
        self,
        num_samples: int,
        y: Tensor | int | list[int] | None = None,
        prompt: str | list[str] | None = None,
        use_ema: bool = True,
    ) -> dict[str, Tensor]:
        """The ``cond`` of ``num_samples`` samples: labels ``y`` and/or prompts (one, or one per sample).

        A condition the model was trained with but not given is the null one (unconditional).
        """
        if y is not None and not self.hparams.num_classes:
            raise ValueError("y= was given but this model was trained without class labels (module.num_classes)")
        if prompt is not None and self.text_encoder is None:
            raise ValueError("prompt= was given but this model was trained without text (text_encoder=...)")
        cond: dict[str, Tensor] = {}
        if self.hparams.num_classes:
            k = self.hparams.num_classes
            labels = torch.as_tensor(k if y is None else y, dtype=torch.long).reshape(-1)
            if len(labels) == 1:
                labels = labels.expand(num_samples)
            if len(labels) != num_samples:
                raise ValueError(f"got {len(labels)} labels for {num_samples} samples; give one or one per sample")
            if y is not None and bool(((labels < 0) | (labels >= k)).any()):
                bad = sorted({int(v) for v in labels if not 0 <= v < k})
                raise ValueError(f"label(s) {bad} outside the model's {k} classes; use y in 0..{k - 1}")
            cond["y"] = labels.to(self.device)
        if self.text_encoder is not None:
            prompts = [prompt or ""] if prompt is None or isinstance(prompt, str) else list(prompt)
            if len(prompts) not in (1, num_samples):
                raise ValueError(f"got {len(prompts)} prompts for {num_samples} samples; give one or one per sample")
            encoded = self.encode_text(prompts, use_ema)
            cond.update({k: v.expand(num_samples, *v.shape[1:]) for k, v in encoded.items()})
        return cond

    def null_condition(self, use_ema: bool = True) -> dict[str, Tensor]:
        """The unconditional ``cond`` (batch of 1: the null label, the empty prompt) for guidance."""
        return self.condition(1, use_ema=use_ema) if self.conditions else {}

    # ----------------------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x0 = batch[0]
        cond = self.condition_from_batch(batch, dropout=self.hparams.cond_dropout)
        if self.distiller is not None:
            loss = self.distiller.loss(self, x0, cond)
        else:
            loss = self.parameterisation.loss(self.net, x0, cond)
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=len(x0))
        self.watch_loss(loss, len(x0))
        return loss

    # A non-finite loss must stop the run with a clear error, but reading the loss on the host every
    # step makes the CPU wait for the GPU. So each step records a non-finite loss on the device (no
    # sync) and the host looks every nan_check_every steps, at the last step, and, whatever the
    # cadence, in on_save_checkpoint (which Lightning calls before it writes any checkpoint, so the
    # error is raised instead of saving bad weights), at each validation and when training ends.
    # Between two checks at most nan_check_every - 1 steps (and possibly a sample grid) are wasted.
    def watch_loss(self, loss: Tensor, batch_size: int) -> None:
        """Record a non-finite ``loss`` on its device; check on the host when due (and show it in the progress bar)."""
        step = self.global_step
        loss = loss.detach().double()
        if self._nonfinite is None or self._nonfinite.device != loss.device:
            self._nonfinite = torch.full((2,), -1.0, dtype=torch.float64, device=loss.device)
        first = ~torch.isfinite(loss) & (self._nonfinite[0] < 0)
        self._nonfinite = torch.where(first, torch.stack([torch.full_like(loss, step), loss]), self._nonfinite)
        every = self.hparams.get("nan_check_every") or (1 if loss.device.type == "cpu" else NAN_CHECK_EVERY)
        last = self._trainer is not None and 0 < self.trainer.max_steps <= step + 1
        if step % every == 0 or last:
            current = self.check_finite(loss)
            # a host (CPU) tensor: the progress bar reads it without waiting for the device
            self.log("loss", torch.tensor(current), prog_bar=True, logger=False, batch_size=batch_size)

    def check_finite(self, loss: Tensor | None = None) -> float | None:
        """Raise if a recorded training loss was non-finite (one host sync); return ``loss`` as a float."""
        if self._nonfinite is None:
            return None
        values = self._nonfinite if loss is None else torch.cat([self._nonfinite, loss.reshape(1)])
        step, value, *current = values.tolist()
        if step >= 0:
            raise FloatingPointError(
                f"the training loss became {value} at step {int(step)}: lower module.lr "
                f"(now {self.hparams.lr}), keep trainer.gradient_clip_val set, or train in precision=32"
            )
        return current[0] if current else None

    def on_validation_epoch_start(self) -> None:
        self.check_finite()

    def on_train_end(self) -> None:
        self.check_finite()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Right after the weights change, before any callback (checkpoint, sample grid) looks at them.
        if self.ema is not None:
            self.ema.update_parameters(self.net)
        if self.ema_text is not None:
            self.ema_text.update_parameters(self.text_encoder)
        if self.distiller is not None:
            self.distiller.after_step(self)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        # A fixed generator makes the validation loss comparable across epochs.
        generator = torch.Generator(self.device).manual_seed(batch_idx)
        cond = self.condition_from_batch(batch, use_ema=True)
        if self.distiller is not None:
            loss = self.distiller.loss(self, batch[0], cond, generator=generator, training=False)
        else:
            loss = self.parameterisation.loss(self.sampling_net(), batch[0], cond, generator=generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch[0]))

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hp.lr, betas=tuple(hp.adam_betas), weight_decay=hp.weight_decay)
        decay = hp.get("lr_decay", "constant")
        total = hp.get("lr_decay_steps") or (self._total_steps() if decay != "constant" else 1)
        factor = partial(lr_factor, warmup=max(1, int(hp.warmup_steps)), decay=decay, total=total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_steps(self) -> int:
        total = self._trainer.estimated_stepping_batches if self._trainer is not None else math.inf
        if not math.isfinite(total):
            raise ValueError(
                f"module.lr_decay={self.hparams.lr_decay} needs a known run length: set trainer.max_steps "
                "(or trainer.max_epochs) or module.lr_decay_steps"
            )
        return int(total)

    # -------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite()  # before Lightning writes the file: never a checkpoint of non-finite weights
        # RNG state so that a resumed run draws the same t / noise as an uninterrupted one would.
        # Stored as tensors and plain lists: the checkpoint stays loadable with weights_only=True.
        np_state = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": _plain(random.getstate()),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        }
        if self.distiller is not None:
            checkpoint["distillation_state"] = self.distiller.state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_architecture(checkpoint.get("hyper_parameters", {}), dict(self.hparams))
        # Resuming a fit (not a plain load_from_checkpoint): restore the RNGs now, before the
        # data loaders are iterated, which is where the uninterrupted run was when it saved.
        if self._trainer is not None and checkpoint.get("rng_states"):
            restore_rng_states(checkpoint["rng_states"])
        if self.distiller is not None and checkpoint.get("distillation_state"):
            self.distiller.load_state(checkpoint["distillation_state"], self)

    # ----------------------------------------------------------------------------- sampling
    def sampling_net(self) -> nn.Module:
        """The EMA network when there is one, else the trained one."""
        return self.ema.module if self.ema is not None else self.net

    def denoiser(self, use_ema: bool = True) -> Denoiser:
        net = self.sampling_net() if use_ema else self.net
        denoiser = Denoiser(net, self.parameterisation, clip_x0=self.hparams.clip_x0)
        return self.distiller.wrap(denoiser) if self.distiller is not None else denoiser

    def guidance(self, config: Mapping[str, Any] | float | None = None, use_ema: bool = True) -> Guidance:
        """The :class:`Guidance` of a ``conf/guidance`` config (or a scale); ``None``: the model's default."""
        if config is None:
            config = self.hparams.guidance
        if isinstance(config, int | float):
            config = {"name": "cfg", "scale": float(config)}
        options = {**NO_GUIDANCE, "name": "cfg", **dict(config)}
        scale = float(options["scale"])
        if options.get("name") == "none" or scale == 1:
            return Guidance()
        if not self.conditions:
            raise ValueError(
                "guidance=cfg needs a model trained with a condition (module.num_classes or text_encoder); "
                "this one is unconditional: use guidance=none"
            )
        return Guidance(scale, self.null_condition(use_ema), options.get("sigma_min"), options.get("sigma_max"))

    def sampler_spec(self, sampler: str | Mapping[str, Any] | None = None, **overrides: Any) -> SamplerSpec:
        """A sampler name (the run's own config for it, else the packaged ``sampler/NAME.yaml``) or config."""
        if isinstance(sampler, str):
            same = sampler == self.hparams.sampler.get("name")
            base = dict(self.hparams.sampler) if same else sampler_config(sampler)
        else:
            base = dict(sampler or self.hparams.sampler)
        spec = SamplerSpec.from_config(base, **overrides)
        self.check_student_sampler(spec)
        return spec

    def check_student_sampler(self, spec: SamplerSpec) -> None:
        """Consistency sampling only for a consistency student; a warning for a student sampled
        otherwise than it was trained for."""
        method = (self.hparams.get("distillation") or {}).get("method")
        consistency = method in ("consistency", "consistency_training")
        if spec.name == "consistency" and not consistency:
            raise ValueError(
                f"sampler=consistency needs a consistency-distilled checkpoint; this is a {method or 'diffusion'} "
                "model: use one of the diffusion samplers (e.g. sampler=dpmpp_2m)"
            )
        trained = self.hparams.sampler
        if consistency and spec.name != "consistency":
            log.warning("a consistency student was not trained for sampler=%s: use sampler=consistency", spec.name)
        elif method == "progressive" and (spec.name, spec.steps) != (trained["name"], trained["steps"]):
            log.warning(
                "this progressive student was trained for %s with %d steps, not %s with %d",
                trained["name"],
                trained["steps"],
                spec.name,
                spec.steps,
            )

    @torch.no_grad()
    def sample_batches(
        self,
        num_samples: int,
        sampler: str | Mapping[str, Any] | None = None,
        steps: int | None = None,
        spacing: str | None = None,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        first_index: int = 0,
        batch_size: int | str = "auto",
        y: Tensor | int | list[int] | None = None,
        prompt: str | list[str] | None = None,
        guidance: Mapping[str, Any] | float | None = None,
        use_ema: bool = True,
        **options: Any,
    ) -> Iterator[SampleResult]:
        """:meth:`sample`, batch by batch (results in [-1, 1], on the model's device)."""
        spec = self.sampler_spec(sampler, steps=steps, spacing=spacing, **options)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        was_training = self.training
        self.eval()
        try:
            cond = self.condition(num_samples, y, prompt, use_ema)
            guide = self.guidance(guidance, use_ema)
            sigmas = None
            if spec.name == "learned" and spec.options.get("coefficients") is None:
                if len(start_candidates(spec.options.get("start_from"))) > 1:  # fit from each, keep the best
                    best = self.learned_start(spec, use_ema)
                    spec = dataclasses.replace(spec, options={**spec.options, "start_from": best})
                sigmas, coefficients = self.fitted_learned(spec, use_ema)
                spec = dataclasses.replace(spec, options={**spec.options, "coefficients": coefficients})
            elif spec.spacing in MODEL_SPACINGS:
                sigmas = self.optimized_sigmas(spec, use_ema)
            for result in iter_generate(
                self.denoiser(use_ema),
                self.schedule,
                spec,
                self._sample_shape(),
                num_samples,
                batch_size=batch_size,
                seed=seed,
                first_index=first_index,
                device=self.device,
                cond=cond,
                guidance=guide,
                to_cpu=False,
                sigmas=sigmas,
            ):
                result.images = result.images.clamp(-1, 1)
                yield result
        finally:
            self.train(was_training)

    def sample(
        self,
        num_samples: int,
        sampler: str | Mapping[str, Any] | None = None,
        steps: int | None = None,
        spacing: str | None = None,
        *,
        return_result: bool = False,
        progress: Callable[[int], None] | None = None,
        **kwargs: Any,
    ) -> Tensor | SampleResult:
        """Draw ``num_samples`` images in [-1, 1] with the EMA weights (when there are any).

        ``sampler`` is a name (``"ddim"``: the run's own config for it, else the packaged
        ``sampler/ddim.yaml``) or a full sampler config; ``steps``, ``spacing`` and options (e.g.
        ``eta=0.5``) override it. Conditions: ``y`` (labels), ``prompt`` (text), ``guidance`` (a
        ``conf/guidance`` config or a CFG scale). Sample i of ``seed`` is the same image whatever
        the batch size (``first_index`` shifts the indices); without ``seed`` one is drawn from
        ``generator`` (or torch's global RNG). With ``return_result`` the NFE and time come back too.
        """
        result = collect(self.sample_batches(num_samples, sampler, steps, spacing, **kwargs), progress)
        return result if return_result else result.images

    def fitted_learned(self, spec: SamplerSpec, use_ema: bool = True) -> tuple[Tensor, list[list[float]]]:
        """``sampler=learned``'s grid (its spacing's, or the ``optimized`` / ``ld3`` one for this model) and
        its weights fitted for this model on that grid (:meth:`learned_coefficients`)."""
        if spec.spacing not in MODEL_SPACINGS:
            grid = spec.sigmas(self.schedule)
            return grid, self.learned_coefficients(spec, grid, use_ema)
        grid = self.optimized_sigmas(spec, use_ema)
        # a searched grid may start below the top: its weights aim at the solution from the top
        return grid, self.learned_coefficients(spec, grid, use_ema, start_sigma=search_top(self.schedule, spec))

    def learned_start(self, spec: SamplerSpec, use_ema: bool = True) -> str:
        """``sampler=learned`` with ``start_from=[unipc, dpmpp_3m, ...]``: the one of them to fit from, the
        one whose fitted sampler (on its own grid) ends closest to the ODE solution on held-out noise
        (:func:`~fewstep.diffusion.sampling.learned_start`); each fit and the choice are cached."""
        candidates = {}
        for name in start_candidates(spec.options["start_from"]):
            candidates[name] = self.fitted_learned(
                dataclasses.replace(spec, options={**spec.options, "start_from": name}), use_ema
            )
        searched = spec.spacing in MODEL_SPACINGS  # then the fits aim at the solution from the top of the search
        top = search_top(self.schedule, spec) if searched else float(spec.sigmas(self.schedule)[0])
        key = self._cache_key(use_ema)
        memo = [key, "learned_start", {k: [g.tolist(), w] for k, (g, w) in candidates.items()}, top]
        return self._memoised(
            memo,
            lambda: learned_start(
                self.denoiser(use_ema),
                spec,
                candidates,
                self._sample_shape(),
                start_sigma=top,
                end_sigma=self.schedule.sigma_min,
                device=self.device,
                cond=self.condition(32, use_ema=use_ema),
                cache_path=self.sigmas_cache if self.checkpoint_id else None,
                cache_key=key,
            ),
        )

    def learned_coefficients(
        self, spec: SamplerSpec, sigmas: Tensor, use_ema: bool = True, start_sigma: float | None = None
    ) -> list[list[float]]:
        """``sampler=learned``'s weights for this model and grid, fitted on unconditional (null-condition)
        trajectories (from ``noise * start_sigma`` when given, else from the grid's first level, down to
        the schedule's smallest level, then denoised): cached beside the checkpoint (keyed by the file's
        hash), or in memory for the current training step."""
        key = self._cache_key(use_ema)
        return self._memoised(
            [key, "learned", sigmas.tolist(), start_sigma, spec.options, spec.dynamic_threshold],
            lambda: learned_coefficients(
                self.denoiser(use_ema),
                spec,
                sigmas,
                self._sample_shape(),
                device=self.device,
                cond=self.condition(64, use_ema=use_ema),
                start_sigma=start_sigma,
                end_sigma=self.schedule.sigma_min,
                cache_path=self.sigmas_cache if self.checkpoint_id else None,
                cache_key=key,
            ),
        )

    def optimized_sigmas(self, spec: SamplerSpec, use_ema: bool = True) -> Tensor:
        """The ``optimized`` or ``ld3`` grid for this model and sampler: cached beside the checkpoint it was
        loaded from (keyed by the file's hash), or in memory for the current training step."""
        key = self._cache_key(use_ema)

        def compute() -> Tensor:
            with frozen(self):  # ld3 differentiates through the network: only for the grid, not the weights
                return optimized_sigmas(
                    self.denoiser(use_ema),
                    self.schedule,
                    spec,
                    self._sample_shape(),
                    device=self.device,
                    cache_path=self.sigmas_cache if self.checkpoint_id else None,
                    cache_key=key,
                )

        memo = [key, spec.name, spec.steps, spec.spacing, spec.options, spec.spacing_options, spec.dynamic_threshold]
        return self._memoised(memo, compute)

    def _sample_shape(self) -> tuple[int, int, int]:
        return (self.hparams.channels, self.hparams.image_size, self.hparams.image_size)

    def _cache_key(self, use_ema: bool) -> dict[str, Any]:
        """What identifies the weights a grid or fit was made for: the checkpoint file's hash (else the
        training step) and which weights (EMA or not)."""
        return {
            "weights": self.checkpoint_id or f"step-{self.global_step}",
            "ema": bool(use_ema and self.ema is not None),
        }

    def _memoised(self, memo: list, compute: Callable[[], Any]) -> Any:
        """``compute()``, once per ``memo`` (a JSON-able description) while this model lives: the on-disk
        cache needs a checkpoint, and during training a grid or fit is reused within the step."""
        text = json.dumps(memo, sort_keys=True, default=str)
        if text not in self._optimized:
            if len(self._optimized) > 32:
                self._optimized.clear()
            self._optimized[text] = compute()
        return self._optimized[text]


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """``module``'s parameters without ``requires_grad`` for the duration (restored afterwards)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


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
    saved, current = _with_net(saved), _with_net(current)
    # sigma_data scales edm's input and output; other predictions ignore it (older checkpoints lack it)
    keys = (*ARCHITECTURE_KEYS, "sigma_data") if saved.get("prediction") == "edm" else ARCHITECTURE_KEYS
    diffs = [
        f"{k}={saved.get(k)!r} (this run: {current.get(k)!r})"
        for k in keys
        if _plain(saved.get(k)) != _plain(current.get(k))
    ]
    if diffs:
        raise ValueError(
            f"{path} was trained with another architecture: {'; '.join(diffs)}. "
            "Use the same model=/data= options as the run that wrote it, or start a new run without ckpt_path"
        )


def _with_net(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Hyper-parameters with the network as a ``net`` config (older checkpoints stored ``unet`` options)."""
    hparams = dict(hparams)
    if hparams.get("net") is None:
        hparams["net"] = {**DEFAULT_NET, **dict(hparams.get("unet") or {})}
    return hparams


def _plain(value: Any) -> Any:
    """Containers as plain dicts/lists of primitives (safe for weights_only checkpoint loading)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
