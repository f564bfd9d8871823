"""fewstep: train image diffusion models with Lightning + Hydra, and sample them in few steps.

The main API, importable from the top level::

    from fewstep import DiffusionModel, load_model, SAMPLERS
    model = load_model("logs/train/runs/<run>/checkpoints/last.ckpt")
    images = model.sample(16, "dpmpp_2m", steps=10)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module; imported on first use so that ``import fewstep.samplers`` stays light (no Lightning)
_EXPORTS = {
    "DiffusionModel": "fewstep.lit",
    "ImageDataModule": "fewstep.lit",
    "load_model": "fewstep.lit",
    "load_checkpoint": "fewstep.lit",
    "SAMPLERS": "fewstep.samplers",
    "SPACINGS": "fewstep.samplers",
    "get_sampler": "fewstep.samplers",
    "Denoiser": "fewstep.diffusion",
    "Parameterisation": "fewstep.diffusion",
    "ClassifierFreeGuidance": "fewstep.diffusion",
    "LinearSchedule": "fewstep.diffusion",
    "CosineSchedule": "fewstep.diffusion",
    "make_schedule": "fewstep.diffusion",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fewstep' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
