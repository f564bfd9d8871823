"""Schedules, the parameterisation (training loss + denoiser), guidance and the sampling loop."""

from fewstep.diffusion.guidance import ClassifierFreeGuidance
from fewstep.diffusion.parameterisation import (
    LOSS_WEIGHTINGS,
    PREDICTIONS,
    Denoiser,
    Parameterisation,
    training_target,
)
from fewstep.diffusion.schedules import CosineSchedule, LinearSchedule, Schedule, make_schedule

__all__ = [
    "LOSS_WEIGHTINGS",
    "PREDICTIONS",
    "ClassifierFreeGuidance",
    "CosineSchedule",
    "Denoiser",
    "LinearSchedule",
    "Parameterisation",
    "Schedule",
    "make_schedule",
    "training_target",
]
