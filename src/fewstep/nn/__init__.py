"""Networks only: they know nothing of schedules or samplers."""

from fewstep.nn.unet import UNet

__all__ = ["UNet"]
