"""The LightningModule and the LightningDataModule."""

from fewstep.lit.checkpoint import load_checkpoint, load_model
from fewstep.lit.datamodule import ImageDataModule
from fewstep.lit.module import DiffusionModel

__all__ = ["DiffusionModel", "ImageDataModule", "load_checkpoint", "load_model"]
