"""FID, KID and IS of generated images, streamed batch by batch, against cached real-data statistics.

- FID, the Frechet distance between Gaussians fitted to real and generated features
  (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium"): ``||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))``.
- KID, the unbiased squared MMD with the cubic polynomial kernel ``(x.y / d + 1)^3``, averaged
  over random subsets (Binkowski et al. 2018, "Demystifying MMD GANs"); unbiased, so ~0 (and
  possibly slightly negative) for samples of the real distribution.
- IS, ``exp(E_x KL(p(y|x) || p(y)))`` over splits (Salimans et al. 2016, "Improved Techniques
  for Training GANs"): k for confident predictions spread evenly over k classes, 1 at worst.

The arithmetic is torchmetrics' (``FrechetInceptionDistance``, ``KernelInceptionDistance``,
``InceptionScore``). The feature extractor runs once per batch here and hands its features (FID,
KID) and logits (IS) to the three metrics through an identity "feature" module, so no image is
kept: only the running sums of FID and the feature vectors KID and IS need (n x 128 or 2048 floats).

Real statistics come from the cache (:mod:`fewstep.metrics.reference`) and are written into the
metrics' real-feature states, which ``reset_real_features=False`` keeps across ``reset()``.
Under DDP every rank draws its share of the samples and the states are synced by torchmetrics
over the default process group when ``compute()`` runs (on every rank). So that the sync
reassembles the reference exactly once, rank 0 holds FID's real sums (the others zeros; the
reduction is a sum) and the cached KID features are dealt out across ranks (the reduction is a
concatenation).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.utilities import dim_zero_cat

from fewstep.metrics.features import FeatureExtractor
from fewstep.metrics.reference import ReferenceStats

METRICS = ("fid", "kid", "is")


class _Given(nn.Module):
    """The identity, with the ``num_features`` torchmetrics reads from a custom feature module."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: Tensor) -> Tensor:
        return features


class _KID(KernelInceptionDistance):
    """KID whose subset size shrinks to the number of samples when fewer were drawn (small smoke runs)."""

    def compute(self) -> tuple[Tensor, Tensor]:
        n = min(len(dim_zero_cat(self.real_features)), len(dim_zero_cat(self.fake_features)))
        if n < 2:
            raise ValueError(f"KID needs at least 2 real and 2 generated samples, got {n}")
        requested = self.subset_size
        self.subset_size = min(requested, n)
        try:
            return super().compute()
        finally:
            self.subset_size = requested


class _IS(InceptionScore):
    """IS with at most one split per sample (tiny runs), so every split holds images."""

    def compute(self) -> tuple[Tensor, Tensor]:
        requested = self.splits
        self.splits = max(1, min(requested, len(dim_zero_cat(self.features))))
        try:
            with warnings.catch_warnings():  # the std of a single split is nan: reported as None
                warnings.filterwarnings("ignore", message=".*degrees of freedom", category=UserWarning)
                return super().compute()
        finally:
            self.splits = requested


class GenerativeScores(nn.Module):
    """Streams generated images through a feature extractor into FID / KID / IS against reference statistics.

    Example::

        scores = GenerativeScores(extractor, reference_stats(data, extractor))
        for batch in batches_of_samples:     # images in [-1, 1]
            scores.update(batch)
        scores.compute()   # {"fid": ..., "kid_mean": ..., "kid_std": ..., "is_mean": ..., "is_std": ..., ...}

    Args:
        metrics: which of ``fid``, ``kid``, ``is`` to compute.
        kid_subsets, kid_subset_size: KID's random subsets (torchmetrics' defaults: 100 of 1000).
        is_splits: IS splits (10, as Salimans et al.).
        seed: seeds KID's subsets and IS's permutation, so every rank (and every run) gets the same numbers.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        reference: ReferenceStats,
        *,
        metrics: tuple[str, ...] | list[str] = METRICS,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        is_splits: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__()
        unknown = sorted(set(metrics) - set(METRICS))
        if unknown or not metrics:
            raise ValueError(f"unknown metrics {unknown or '[]'}; choose from: {', '.join(METRICS)}")
        if reference.features_sum.shape[0] != extractor.num_features:
            raise ValueError(
                f"the reference statistics have {reference.features_sum.shape[0]} features, "
                f"{extractor.name} gives {extractor.num_features}: they come from another extractor"
            )
        self.extractor, self.seed = extractor, seed
        self.metric_names = tuple(m for m in METRICS if m in metrics)
        self.reference = reference
        dim = extractor.num_features
        with warnings.catch_warnings():  # "will save all extracted features": features, not images, here
            warnings.simplefilter("ignore", UserWarning)
            self.fid = FrechetInceptionDistance(feature=_Given(dim), reset_real_features=False)
            self.kid = _KID(
                feature=_Given(dim), subsets=kid_subsets, subset_size=kid_subset_size, reset_real_features=False
            )
            self.inception_score = _IS(feature=_Given(extractor.num_classes), splits=is_splits)
        self.to(extractor.device)
        self.set_reference(reference)

    @property
    def features(self) -> str:
        return self.extractor.name

    def set_reference(self, reference: ReferenceStats) -> None:
        """Write the real-feature states: rank 0 holds FID's sums, KID's features are dealt out over the ranks."""
        rank, world = _rank_world()
        device = self.fid.real_features_sum.device
        take = rank == 0
        self.fid.real_features_sum = reference.features_sum.to(device, torch.float64) * take
        self.fid.real_features_cov_sum = reference.cov_sum.to(device, torch.float64) * take
        self.fid.real_features_num_samples = torch.tensor(reference.num * take, dtype=torch.long, device=device)
        if "kid" in self.metric_names:
            if len(reference.kid_features) < max(2, world):
                raise ValueError(
                    f"the reference statistics hold {len(reference.kid_features)} real features for KID; "
                    f"need at least {max(2, world)}: raise max_kid_features or drop kid from the metrics"
                )
            self.kid.real_features = [reference.kid_features[rank::world].to(device)]
        self.reference = reference

    def reset(self) -> None:
        """Forget the generated samples (the reference stays)."""
        self.fid.reset()
        self.kid.reset()
        self.inception_score.reset()

    @torch.no_grad()
    def update(self, images: Tensor) -> None:
        """Add a batch of generated images in [-1, 1]: one pass of the extractor feeds every metric."""
        features, logits = self.extractor(images.to(self.extractor.device))
        if "fid" in self.metric_names:
            self.fid.update(features, real=False)
        if "kid" in self.metric_names:
            self.kid.update(features, real=False)
        if "is" in self.metric_names:
            self.inception_score.update(logits)

    @torch.no_grad()
    def compute(self) -> dict[str, Any]:
        """All metrics, synced over the ranks: every rank must call this (it runs collectives)."""
        # One tensor per list state and rank: torchmetrics gathers list states element by element,
        # so the ranks must hold equally many elements (however many batches each one saw).
        _compact(self.kid, "fake_features")
        _compact(self.inception_score, "features")
        out: dict[str, Any] = {"features": self.features}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if "fid" in self.metric_names:
                out["fid"] = float(self.fid.compute())
                out["n"] = int(_synced_count(self.fid))
            if "kid" in self.metric_names:
                mean, std = self.kid.compute()
                out["kid_mean"], out["kid_std"] = float(mean), float(std)
            if "is" in self.metric_names:
                mean, std = self.inception_score.compute()
                out["is_mean"], out["is_std"] = float(mean), _finite(float(std))
        out["reference_n"] = self.reference.num
        return out


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _compact(metric: nn.Module, attr: str) -> None:
    """Concatenate a list state into one tensor (an empty ``[0, D]`` one when nothing was added)."""
    value = getattr(metric, attr)
    if isinstance(value, list) and len(value) != 1:
        setattr(metric, attr, [torch.cat(value)] if value else [])


def _synced_count(fid: FrechetInceptionDistance) -> int:
    """The number of generated samples over all ranks (FID's state, summed by the sync of compute)."""
    count = fid.fake_features_num_samples.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(count)
    return int(count)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
