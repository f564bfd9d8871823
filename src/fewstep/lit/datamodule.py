"""ImageDataModule: train/val loaders for every dataset of ``conf/data``."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import transforms as T

from fewstep.data import TORCHVISION_SETS, ImageFolderDataset, mnist5k, torchvision_set

DATASETS = ("mnist5k", "folder", *TORCHVISION_SETS)


class EpochShuffle(Sampler[int]):
    """A shuffle that depends only on (seed, epoch): a resumed run sees the same order as an uninterrupted one.

    Lightning calls ``set_epoch`` before each epoch; under DDP it swaps in a DistributedSampler,
    which follows the same rule.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class _Flip(Dataset):
    """Random horizontal flips of a dataset's images (training split only)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset, self.flip = dataset, T.RandomHorizontalFlip()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return self.flip(image), label


class ImageDataModule(L.LightningDataModule):
    """``(image, label)`` batches, images in [-1, 1]; a deterministic train/val split.

    Args:
        name: ``mnist5k`` (embedded, offline), ``mnist``, ``fashion_mnist``, ``cifar10``
            (torchvision, downloaded under ``root``) or ``folder`` (every image under ``root``).
        image_size: side of the square images; ``channels`` is fixed by the dataset except for folders.
        val_fraction: share of the training images held out (the same ones for every run: ``split_seed``).
    """

    def __init__(
        self,
        name: str = "mnist5k",
        root: str = "data",
        image_size: int = 32,
        channels: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        random_flip: bool = False,
        download: bool = True,
    ) -> None:
        super().__init__()
        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if image_size < 8:
            raise ValueError(f"data.image_size must be at least 8, got {image_size}")
        fixed = 1 if name == "mnist5k" else TORCHVISION_SETS.get(name, (None, None))[1]
        if fixed is not None and channels not in (None, fixed):
            raise ValueError(f"data={name} has {fixed} channel(s); remove data.channels={channels}")
        self.name, self.root, self.image_size = name, root, image_size
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.random_flip, self.download = random_flip, download
        self.channels = fixed or channels or 3
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def prepare_data(self) -> None:
        # Downloads happen once, on one process (Lightning calls this on rank 0 only).
        if self.name in TORCHVISION_SETS and self.download:
            torchvision_set(self.name, self.root, True, self.image_size, download=True)

    def full_dataset(self, train: bool = True) -> Dataset:
        if self.name == "mnist5k":
            return mnist5k(self.image_size)
        if self.name == "folder":
            return ImageFolderDataset(self.root, self.image_size, self.channels)
        return torchvision_set(self.name, self.root, train, self.image_size, download=False)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        full = self.full_dataset(train=True)
        order = torch.randperm(len(full), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        n_val = int(round(len(full) * self.val_fraction))
        if len(full) - n_val < 1:
            raise ValueError(
                f"data={self.name} has only {len(full)} images: too few to hold out {n_val} for validation"
            )
        train = Subset(full, order[n_val:])
        self.train_set = _Flip(train) if self.random_flip else train
        self.val_set = Subset(full, order[:n_val]) if n_val else None

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffle(len(dataset), self.split_seed) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=shuffle and len(dataset) >= self.batch_size,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []
