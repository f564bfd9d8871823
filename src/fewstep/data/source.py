"""What a dataset is: its images, labels, captions and deterministic train/val split, from a data config.

The Lightning DataModule (``fewstep.lit.ImageDataModule``) adds loaders on top; the metrics read the
same splits from here without importing anything of Lightning.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from fewstep.data.captions import CaptionRules
from fewstep.data.datasets import (
    TORCHVISION_SETS,
    ImageFolderDataset,
    captioned_mnist5k,
    dataset_captions,
    dataset_labels,
    mnist5k,
    torchvision_set,
)

DATASETS = ("mnist5k", "folder", *TORCHVISION_SETS)
CAPTIONED = ("mnist5k", "folder")  # the data sets that can have captions (data.captions=true)


class DataSource:
    """A dataset by name (``conf/data``), its held-out split and what it holds.

    Args:
        name: ``mnist5k`` (embedded, offline), ``mnist``, ``fashion_mnist``, ``cifar10``
            (torchvision, downloaded under ``root``) or ``folder`` (every image under ``root``).
        image_size: side of the square images; ``channels`` is fixed by the dataset except for folders.
        val_fraction: share of the training images held out (the same ones for every run: ``split_seed``).
        captions: items are ``(image, label, caption)``: ``mnist5k`` digits captioned from their label
            and measured attributes (:mod:`fewstep.data.captions`), or ``folder`` captions from
            ``root/metadata.jsonl``.
    """

    def __init__(
        self,
        name: str = "mnist5k",
        root: str = "data",
        image_size: int = 32,
        channels: int | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        download: bool = True,
        captions: bool = False,
    ) -> None:
        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
        if captions and name not in CAPTIONED:
            raise ValueError(f"data={name} has no captions; use data=mnist5k_captions or data=folder with captions")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if image_size < 8:
            raise ValueError(f"data.image_size must be at least 8, got {image_size}")
        fixed = 1 if name == "mnist5k" else TORCHVISION_SETS.get(name, (None, None))[1]
        if fixed is not None and channels not in (None, fixed):
            raise ValueError(f"data={name} has {fixed} channel(s); remove data.channels={channels}")
        self.name, self.root, self.image_size = name, root, image_size
        self.val_fraction, self.split_seed, self.download = val_fraction, split_seed, download
        self.channels = fixed or channels or 3
        self.captions = captions
        self.caption_rules: CaptionRules | None = None  # captioned mnist5k: the rules its captions follow
        self.full_set: Dataset | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @classmethod
    def from_config(cls, data: Mapping[str, Any], **overrides: Any) -> DataSource:
        """From a data config (``conf/data`` or a checkpoint's ``hparams.data``); loader options are ignored."""
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        return cls(**{**{k: v for k, v in dict(data).items() if k in known}, **overrides})

    def prepare(self) -> None:
        """Download what must be downloaded (torchvision sets), once."""
        if self.name in TORCHVISION_SETS and self.download:
            torchvision_set(self.name, self.root, True, self.image_size, download=True)

    def full_dataset(self, train: bool = True) -> Dataset:
        if self.name == "mnist5k" and self.captions:
            dataset = captioned_mnist5k(self.image_size)
            self.caption_rules = dataset.rules
            return dataset
        if self.name == "mnist5k":
            return mnist5k(self.image_size)
        if self.name == "folder":
            return ImageFolderDataset(self.root, self.image_size, self.channels, captions=self.captions)
        return torchvision_set(self.name, self.root, train, self.image_size, download=False)

    def setup(self) -> DataSource:
        """Load the training set and split it: the same held-out images for every run of ``split_seed``."""
        if self.train_set is not None:
            return self
        full = self.full_set = self.full_dataset(train=True)
        order = torch.randperm(len(full), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        n_val = int(round(len(full) * self.val_fraction))
        if len(full) - n_val < 1:
            raise ValueError(
                f"data={self.name} has only {len(full)} images: too few to hold out {n_val} for validation"
            )
        self.train_set = Subset(full, order[n_val:])
        self.val_set = Subset(full, order[:n_val]) if n_val else None
        return self

    @property
    def num_classes(self) -> int | None:
        """Classes of the labels: 10 for the MNIST-like sets and CIFAR-10, the sub-folders of a folder; None if < 2."""
        if self.name != "folder":
            return 10
        self.setup()
        n = len(self.full_set.class_index)  # type: ignore[union-attr]
        return n if n >= 2 else None

    def class_frequencies(self) -> torch.Tensor:
        """Relative label frequencies of the training split, float ``[max(num_classes, 1)]`` summing to 1."""
        labels = dataset_labels(self.setup().train_set)
        counts = torch.bincount(labels, minlength=self.num_classes or 1).double()
        return counts / counts.sum()

    def train_captions(self) -> list[str]:
        """The training split's captions, in dataset order (to build a vocabulary from)."""
        if not self.captions:
            raise ValueError(f"data={self.name} is not captioned; set data.captions=true (data=mnist5k_captions)")
        return dataset_captions(self.setup().train_set)
