"""Datasets yielding ``(image in [-1, 1], label)``, or ``(image, label, caption)`` when captioned."""

from fewstep.data.captions import (
    BINS,
    CaptionRules,
    attribute_adherence,
    caption_for,
    digit_attributes,
    make_captions,
    parse_caption,
)
from fewstep.data.datasets import (
    TORCHVISION_SETS,
    CaptionedDataset,
    ImageFolderDataset,
    captioned_mnist5k,
    dataset_captions,
    dataset_labels,
    mnist5k,
    read_metadata,
    torchvision_set,
)
from fewstep.data.source import CAPTIONED, DATASETS, DataSource

__all__ = [
    "BINS",
    "CAPTIONED",
    "DATASETS",
    "DataSource",
    "TORCHVISION_SETS",
    "CaptionRules",
    "CaptionedDataset",
    "ImageFolderDataset",
    "attribute_adherence",
    "caption_for",
    "captioned_mnist5k",
    "dataset_captions",
    "dataset_labels",
    "digit_attributes",
    "make_captions",
    "mnist5k",
    "parse_caption",
    "read_metadata",
    "torchvision_set",
]
