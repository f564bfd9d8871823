"""Schedules, the denoiser wrapper and the training loss."""

from fewstep.diffusion.denoiser import PREDICTIONS, Denoiser
from fewstep.diffusion.losses import diffusion_loss, training_target
from fewstep.diffusion.schedules import CosineSchedule, LinearSchedule, Schedule, make_schedule

__all__ = [
    "PREDICTIONS",
    "CosineSchedule",
    "Denoiser",
    "LinearSchedule",
    "Schedule",
    "diffusion_loss",
    "make_schedule",
    "training_target",
]
