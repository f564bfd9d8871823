"""Reference statistics of the real data, computed once per (dataset, split, image size, features) and cached.

FID (Heusel et al. 2017) needs the mean and covariance of the real features; they are stored as
the raw accumulators torchmetrics' ``FrechetInceptionDistance`` keeps (the feature sum, the sum
of outer products and the count, all float64), so they can be put straight into its state. KID
(Binkowski et al. 2018) needs real feature vectors themselves (it draws random subsets), so a
seeded random subset of at most ``max_kid_features`` of them is cached too.

Files are ``<cache_dir>/reference/<key>.pt``: a dict of tensors and plain values, written with
``torch.save`` and read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fewstep.data import TORCHVISION_SETS, DataSource
from fewstep.metrics.features import FeatureExtractor

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------ data
def data_channels(data: Mapping[str, Any]) -> int:
    """Channels of a data config's images (fixed by the dataset, or ``channels`` for folders)."""
    name = data.get("name", "mnist5k")
    if name == "mnist5k":
        return 1
    if name in TORCHVISION_SETS:
        return TORCHVISION_SETS[name][1]
    return int(data.get("channels") or 3)


def dataset_id(data: Mapping[str, Any]) -> str:
    """A short name of the dataset for file names: its name, plus a digest of the path for folders."""
    name = str(data.get("name", "mnist5k"))
    if name == "folder":
        root = os.path.abspath(os.path.expanduser(str(data.get("root", ""))))
        return f"folder-{hashlib.sha1(root.encode()).hexdigest()[:8]}"
    return name


def make_datamodule(data: Mapping[str, Any]) -> DataSource:
    """The :class:`DataSource` of a data config (``conf/data``, or a checkpoint's ``hparams.data``), split.

    Items are ``(image, label)`` (captions are not needed to score images) and never flipped:
    reference images are the data as it is.
    """
    source = DataSource.from_config(data, captions=False)
    source.prepare()
    return source.setup()


def split_dataset(datamodule: DataSource, split: str) -> Dataset:
    """``train`` / ``val``: the datamodule's deterministic split; ``test``: torchvision's test set."""
    if split not in SPLITS:
        raise ValueError(f"unknown reference split {split!r}; choose one of: {', '.join(SPLITS)}")
    if split == "train":
        return datamodule.train_set
    if split == "val":
        if datamodule.val_set is None:
            raise ValueError(f"data={datamodule.name} has no validation split (data.val_fraction=0); use split train")
        return datamodule.val_set
    if datamodule.name not in TORCHVISION_SETS:
        raise ValueError(f"data={datamodule.name} has no test split; use the train or val split")
    return datamodule.full_dataset(train=False)


def split_id(data: Mapping[str, Any], split: str) -> str:
    """The split part of cache keys: which images the datamodule's train/val split holds depends on its seed."""
    if split == "test":
        return "test"
    return f"{split}-val{float(data.get('val_fraction', 0.1)):g}-seed{int(data.get('split_seed', 0))}"


def reference_key(data: Mapping[str, Any], split: str, extractor: FeatureExtractor) -> str:
    """``<dataset>-<split>-<size>px-<features>-<weights digest>``, safe as a file name."""
    features = re.sub(r"[^A-Za-z0-9.+-]+", "_", extractor.name)
    size = int(data.get("image_size", 32))
    return f"{dataset_id(data)}-{split_id(data, split)}-{size}px-{features}-{extractor.fingerprint}"


# ----------------------------------------------------------------------------------------- stats
@dataclass
class ReferenceStats:
    """Accumulated real-data features: FID's sums (float64) and a capped subset of features for KID."""

    features_sum: Tensor  # [D] float64: sum of the feature vectors
    cov_sum: Tensor  # [D, D] float64: sum of their outer products x x^T
    num: int  # how many images went into the sums
    kid_features: Tensor  # [M, D] float32: a seeded random subset of the features
    features: str = "given"  # the extractor's name
    key: str = ""
    from_cache: bool = False

    @property
    def mean(self) -> Tensor:
        return self.features_sum / self.num

    @property
    def cov(self) -> Tensor:
        """The unbiased covariance, the same estimate torchmetrics' FID uses."""
        mean = self.mean
        return (self.cov_sum - self.num * torch.outer(mean, mean)) / (self.num - 1)

    @classmethod
    def from_features(cls, features: Tensor, name: str = "given", max_kid_features: int = 10_000) -> ReferenceStats:
        """Statistics of a given ``[N, D]`` feature matrix (all in memory; tests and small sets)."""
        accumulator = _Accumulator(len(features), max_kid_features)
        accumulator.add(features, 0)
        return accumulator.stats(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "features_sum": self.features_sum,
            "cov_sum": self.cov_sum,
            "num": self.num,
            "kid_features": self.kid_features,
            "features": self.features,
            "key": self.key,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (a temporary file renamed), so concurrent readers never see half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(self.to_dict(), tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceStats:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a damaged or foreign file: say which, and how to get rid of it
            raise ValueError(
                f"cannot read reference statistics {path} ({type(err).__name__}); delete the file"
            ) from None
        if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path} holds no reference statistics of this fewstep version; delete the file")
        return cls(
            features_sum=state["features_sum"],
            cov_sum=state["cov_sum"],
            num=int(state["num"]),
            kid_features=state["kid_features"],
            features=state["features"],
            key=state["key"],
            from_cache=True,
        )


class _Accumulator:
    """Streams feature batches into FID's sums and keeps a seeded random subset of rows for KID."""

    def __init__(self, total: int, max_kid_features: int, seed: int = 0) -> None:
        self.total, self.num = total, 0
        self.features_sum: Tensor | None = None
        self.cov_sum: Tensor | None = None
        keep = torch.zeros(total, dtype=torch.bool)
        chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: max(0, max_kid_features)]
        keep[chosen] = True
        self.keep, self.kept = keep, []

    def add(self, features: Tensor, start: int) -> None:
        f64 = features.detach().double()
        if self.features_sum is None:
            self.features_sum = torch.zeros(f64.shape[1], dtype=torch.float64, device=f64.device)
            self.cov_sum = torch.zeros(f64.shape[1], f64.shape[1], dtype=torch.float64, device=f64.device)
        self.features_sum += f64.sum(0)
        self.cov_sum += f64.T @ f64
        self.num += len(features)
        mask = self.keep[start : start + len(features)].to(features.device)
        if mask.any():
            self.kept.append(features[mask].float().cpu())

    def stats(self, name: str, key: str = "") -> ReferenceStats:
        if self.num < 2 or self.features_sum is None:
            raise ValueError(f"reference statistics need at least 2 real images, got {self.num}")
        dim = self.features_sum.shape[0]
        return ReferenceStats(
            features_sum=self.features_sum.cpu(),
            cov_sum=self.cov_sum.cpu(),
            num=self.num,
            kid_features=torch.cat(self.kept) if self.kept else torch.zeros(0, dim),
            features=name,
            key=key,
        )


@torch.no_grad()
def compute_reference(
    dataset: Dataset,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 256,
    max_kid_features: int = 10_000,
    num_workers: int = 0,
    key: str = "",
) -> ReferenceStats:
    """Run ``extractor`` over every image of ``dataset`` (batch by batch) and accumulate the statistics."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    accumulator = _Accumulator(len(dataset), max_kid_features)
    device = extractor.device
    start = 0
    for batch in loader:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        features, _ = extractor(images.to(device))
        accumulator.add(features, start)
        start += len(images)
    return accumulator.stats(extractor.name, key)


def reference_stats(
    data: Mapping[str, Any],
    extractor: FeatureExtractor,
    *,
    split: str = "train",
    cache_dir: str | os.PathLike = "logs/cache",
    max_kid_features: int = 10_000,
    batch_size: int = 256,
    data_root: str | None = None,
    compute: bool = True,
) -> ReferenceStats:
    """The real data's statistics under ``extractor``: from the cache, else computed once and cached.

    The cache key holds the dataset, the split (and the seed/fraction that define it), the image
    size, the extractor's name and a digest of its weights: retraining the classifier or switching
    to Inception never reuses stale statistics. ``compute=False`` only reads the cache (other DDP
    ranks, once rank 0 wrote it).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown reference split {split!r}; choose one of: {', '.join(SPLITS)}")
    if data_root:
        data = {**data, "root": str(data_root)}
    key = reference_key(data, split, extractor)
    path = Path(cache_dir) / "reference" / f"{key}.pt"
    if path.is_file():
        stats = ReferenceStats.load(path)
        if len(stats.kid_features) >= min(max_kid_features, stats.num):
            log.info("reference statistics: %s (cached)", path)
            return stats
    if not compute:
        raise FileNotFoundError(f"reference statistics {path} are missing; compute them first (rank 0)")
    datamodule = make_datamodule(data)
    dataset = split_dataset(datamodule, split)
    log.info("computing reference statistics of %s (%d images) -> %s", key, len(dataset), path)
    stats = compute_reference(
        dataset,
        extractor,
        batch_size=batch_size,
        max_kid_features=max_kid_features,
        num_workers=int(data.get("num_workers") or 0),
        key=key,
    )
    stats.save(path)
    return stats
