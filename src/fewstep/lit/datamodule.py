"""ImageDataModule: train/val loaders for every dataset of ``conf/data``."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from fewstep.data import DATASETS, CaptionRules, DataSource

__all__ = ["DATASETS", "EpochShuffle", "ImageDataModule", "ResumableLoader"]


class EpochShuffle(Sampler[int]):
    """A shuffle that depends only on (seed, epoch): a resumed run sees the same order as an uninterrupted one.

    Lightning calls ``set_epoch`` before each epoch; under DDP it wraps this sampler in a
    DistributedSampler that gives each rank its share of this order. The position within an epoch
    is the training loader's state (:class:`ResumableLoader`).
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


class ResumableLoader(DataLoader):
    """The training DataLoader: a run resumed mid-epoch continues with the very next batch.

    Lightning saves the ``state_dict`` of a training loader that has one (its ``Stateful``
    protocol) in every checkpoint and hands it back to ``load_state_dict`` before the resumed run
    iterates the loader. The state is the epoch and the number of batches this loader has
    *yielded* in it: the batches the run has trained on when the checkpoint was written, not the
    ones its workers had prefetched. The resumed pass then skips that many batches of the same
    (seed, epoch) order by index, without loading them (so skipped images draw no random flips).

    Skipping happens after any sampler Lightning injects (the DistributedSampler under DDP), so
    each rank resumes its own shard. Iterating the loader leaves torch's global RNG alone: the
    worker base seed comes from the loader's own generator, reseeded from (seed, epoch) each
    pass, so the RNG states a checkpoint restores (the noise of ``training_step``) are not shifted
    by the ``iter()`` Lightning calls on resume.
    """

    def __init__(self, dataset: Dataset, *, seed: int = 0, **kwargs) -> None:
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator()
        super().__init__(dataset, **kwargs)
        self.seed = seed
        self._skip, self._skip_epoch = 0, 0  # batches the next pass leaves out, of this epoch (load_state_dict)
        self._yielded = 0  # batches handed out in the current pass, skipped ones included
        self._pass_epoch = self._sampler_epoch()  # the epoch whose order the current pass follows

    def _sampler_epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0) or 0)

    def _set_sampler_epoch(self, epoch: int) -> None:
        # Lightning's _set_sampler_epoch does the same before each epoch: too late for the indices
        # that workers prefetch when the loader is iterated before it.
        samplers = {id(s): s for s in (self.sampler, getattr(self.batch_sampler, "sampler", None)) if s is not None}
        for sampler in samplers.values():
            if callable(getattr(sampler, "set_epoch", None)):
                sampler.set_epoch(epoch)

    @property
    def _index_sampler(self):
        # What DataLoader iterators draw (batches of) indices from: the skip is applied here.
        return _SkipFirst(self, super()._index_sampler)

    def __iter__(self):
        self._yielded, self._pass_epoch = self._skip, self._sampler_epoch()
        self.generator.manual_seed(self.seed * 1_000_003 + self._pass_epoch)
        return self._counted(super().__iter__())

    def _counted(self, batches):
        for batch in batches:
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._pass_epoch, "batches": self._yielded, "length": len(self)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches, length = int(state["epoch"]), int(state["batches"]), int(state.get("length") or len(self))
        if length != len(self):  # another batch size or world size: skip the same share of the epoch
            batches = batches * len(self) // max(length, 1)
        if batches >= len(self):  # saved at the end of an epoch: the next one starts at its beginning
            epoch, batches = epoch + 1, 0
        self._set_sampler_epoch(epoch)
        self._skip = self._yielded = batches
        self._skip_epoch = self._pass_epoch = epoch


class _SkipFirst:
    """A loader's index sampler, less the first ``loader._skip`` batches of its next pass."""

    def __init__(self, loader: ResumableLoader, index_sampler) -> None:
        self.loader, self.index_sampler = loader, index_sampler

    def __len__(self) -> int:
        return len(self.index_sampler)

    def __iter__(self):
        # A generator: runs at the first draw, after Lightning's set_epoch (single-process loading).
        loader = self.loader
        skip, loader._skip = loader._skip, 0
        loader._pass_epoch = loader._sampler_epoch()
        if skip and loader._pass_epoch != loader._skip_epoch:  # the trainer went on to another epoch
            skip = loader._yielded = 0
        indices = iter(self.index_sampler)
        for _ in range(skip):
            if next(indices, None) is None:
                return
        yield from indices


class _Flip(Dataset):
    """Random horizontal flips of a dataset's images (training split only)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset, self.flip = dataset, T.RandomHorizontalFlip()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, *rest = self.dataset[index]  # (image, label) or (image, label, caption)
        return self.flip(image), *rest


class ImageDataModule(L.LightningDataModule):
    """``(image, label)`` batches (``(image, label, captions)`` when captioned), images in [-1, 1];
    a deterministic train/val split. What the data is comes from :class:`fewstep.data.DataSource`.

    Args:
        name: ``mnist5k`` (embedded, offline), ``mnist``, ``fashion_mnist``, ``cifar10``
            (torchvision, downloaded under ``root``) or ``folder`` (every image under ``root``).
        image_size: side of the square images; ``channels`` is fixed by the dataset except for folders.
        val_fraction: share of the training images held out (the same ones for every run: ``split_seed``).
        captions: batches are ``(image, label, captions)`` (a list of str): ``mnist5k`` digits
            captioned from their label and measured attributes (:mod:`fewstep.data.captions`), or
            ``folder`` captions from ``root/metadata.jsonl``.
        random_flip: random horizontal flips of the training images.
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
        captions: bool = False,
    ) -> None:
        super().__init__()
        if captions and random_flip and name == "mnist5k":
            raise ValueError("data.random_flip=true mirrors slants, and captions name them; set data.random_flip=false")
        self.source = DataSource(name, root, image_size, channels, val_fraction, split_seed, download, captions)
        self.name, self.root, self.image_size, self.channels = name, root, image_size, self.source.channels
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.random_flip, self.download, self.captions = random_flip, download, captions
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def caption_rules(self) -> CaptionRules | None:
        """Captioned mnist5k: the rules its captions follow (to score generated samples with)."""
        return self.source.caption_rules

    @property
    def num_classes(self) -> int | None:
        return self.source.num_classes

    def class_frequencies(self) -> torch.Tensor:
        return self.source.class_frequencies()

    def train_captions(self) -> list[str]:
        return self.source.train_captions()

    def full_dataset(self, train: bool = True) -> Dataset:
        return self.source.full_dataset(train)

    def prepare_data(self) -> None:
        # Downloads happen once, on one process (Lightning calls this on rank 0 only).
        self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.source.setup()
        train = self.source.train_set
        self.train_set = _Flip(train) if self.random_flip else train
        self.val_set = self.source.val_set

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        options = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "drop_last": shuffle and len(dataset) >= self.batch_size,
            "pin_memory": torch.cuda.is_available(),
        }
        if shuffle:  # training: resumable mid-epoch (see ResumableLoader)
            sampler = EpochShuffle(len(dataset), self.split_seed)
            return ResumableLoader(dataset, sampler=sampler, seed=self.split_seed, **options)
        # Its own generator: iterating it must not draw from torch's global RNG (the training noise).
        return DataLoader(dataset, generator=torch.Generator().manual_seed(self.split_seed), **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []
