"""Feature extractors and FID / KID / IS plumbing around torchmetrics (see ``scores.py`` for the papers)."""

from fewstep.metrics.features import (
    FeatureExtractor,
    GivenFeatures,
    InceptionFeatures,
    build_features,
    resolve_features,
)
from fewstep.metrics.reference import ReferenceStats, compute_reference, reference_key, reference_stats
from fewstep.metrics.scores import METRICS, GenerativeScores

__all__ = [
    "METRICS",
    "FeatureExtractor",
    "GenerativeScores",
    "GivenFeatures",
    "InceptionFeatures",
    "ReferenceStats",
    "build_features",
    "compute_reference",
    "reference_key",
    "reference_stats",
    "resolve_features",
]
