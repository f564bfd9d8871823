"""Datasets yielding ``(image in [-1, 1], label)``."""

from fewstep.data.datasets import TORCHVISION_SETS, ImageFolderDataset, mnist5k, torchvision_set

__all__ = ["TORCHVISION_SETS", "ImageFolderDataset", "mnist5k", "torchvision_set"]
