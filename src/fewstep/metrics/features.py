"""Feature extractors for FID / KID / IS: the standard FID Inception-v3, or a small classifier fewstep trains.

Every extractor maps images in [-1, 1] (``[B, C, H, W]``, the range fewstep's data and samplers
use) to ``(features [B, num_features], logits [B, num_classes])``: the features feed FID and
KID, the logits feed the Inception Score. Its ``name`` is what summaries report ("features"),
its ``fingerprint`` (a digest of its weights) keys the caches of reference statistics.

Choose one with the ``features`` config group (``conf/features``):

- ``inception``: the Inception-v3 of the original TensorFlow FID code (Heusel et al. 2017), as
  ported by torch-fidelity (which torchmetrics uses too): 2048-d pool features and the 1008
  logits ("logits_unbiased") for IS. Scores with it are comparable to published numbers.
- ``classifier``: a small CNN trained on the model's own dataset (:mod:`fewstep.metrics.classifier`);
  the usual choice for MNIST-like data, where Inception features mean little.
- ``auto``: ``classifier`` for 1-channel data, ``inception`` for RGB.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.error import URLError

import torch
from torch import Tensor, nn

from fewstep.utils import file_digest as sha256_digest

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[1]
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
FEATURES = ("auto", "classifier", "inception")
log = logging.getLogger(__name__)


class FeatureExtractor(nn.Module):
    """Base class: ``forward(images in [-1, 1]) -> (features, logits)``; always in eval mode, no gradients."""

    name: str = "features"
    fingerprint: str = ""
    num_features: int
    num_classes: int

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        tensor = next(iter(self.parameters()), None)
        return tensor.device if tensor is not None else torch.device("cpu")


class GivenFeatures(FeatureExtractor):
    """The identity: the "images" are already feature vectors (tests, benchmarks, precomputed features).

    ``logits`` are the features too, so IS reads them as class logits.
    """

    def __init__(self, num_features: int, name: str = "given") -> None:
        super().__init__()
        self.num_features = self.num_classes = int(num_features)
        self.name, self.fingerprint = name, f"given{num_features}"

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = images.reshape(len(images), -1).float()
        if features.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} features per item, got {features.shape[1]}")
        return features, features


class InceptionFeatures(FeatureExtractor):
    """The FID Inception-v3 (the TF graph ``pt_inception-2015-12-05`` of Heusel et al. 2017, via torch-fidelity).

    Images are converted to uint8 RGB (gray images repeat their channel) and resized to 299x299
    with TensorFlow-1 compatible bilinear interpolation, exactly as the reference implementation.
    Features: the 2048-d pool3 activations; logits: the 1008 unbiased logits used by the
    Inception Score (Salimans et al. 2016). Named ``inception-v3-2048`` with the standard weights
    (SHA-256 ``6726825d0af5...``), ``inception-v3-2048@<digest>`` with any other file.

    Args:
        weights_path: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``. ``None``: the
            copy in torch hub's cache (``$TORCH_HOME/hub/checkpoints``), downloaded there on first use.
    """

    num_features = 2048
    num_classes = 1008

    def __init__(self, weights_path: str | os.PathLike | None = None) -> None:
        super().__init__()
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise ValueError(
                "features=inception needs the torch-fidelity package: pip install torch-fidelity "
                "(or use features=classifier)"
            ) from None
        path = inception_weights(weights_path)
        _check_state_dict(path, required=("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.conv.weight", "fc.weight"))
        # torch-fidelity reads the file with full unpickling; it was just checked to load with weights_only=True.
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"], str(path))
        self.fingerprint = file_digest(path)
        # Only the standard weights give the standard name; other weights are marked by their digest.
        self.name = (
            "inception-v3-2048"
            if self.fingerprint == INCEPTION_SHA256[:12]
            else f"inception-v3-2048@{self.fingerprint}"
        )
        if self.fingerprint != INCEPTION_SHA256[:12]:
            log.warning(
                "%s is not the standard FID Inception file (sha256 %s...): scores are not comparable",
                path,
                INCEPTION_SHA256[:12],
            )

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception features need [B, 1 or 3, H, W] images, got shape {tuple(images.shape)}")
        uint8 = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        if uint8.shape[1] == 1:
            uint8 = uint8.expand(-1, 3, -1, -1)
        features, logits = self.net(uint8)
        return features.float(), logits.float()


def inception_weights(weights_path: str | os.PathLike | None = None) -> Path:
    """The local file of the FID Inception weights: ``weights_path``, or torch hub's cached (downloaded) copy."""
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"features.weights_path={path} does not exist; point it at {INCEPTION_FILE} (from {INCEPTION_URL})"
            )
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(INCEPTION_URL, str(path), hash_prefix="6726825d", progress=False)
    except (URLError, OSError, RuntimeError) as err:
        raise FileNotFoundError(
            f"cannot download the FID Inception weights ({type(err).__name__}: {str(err)[:80]}); this machine may "
            f"be offline: fetch {INCEPTION_URL} elsewhere and pass features.weights_path=/path/to/{INCEPTION_FILE} "
            "(or use features=classifier)"
        ) from None
    return path


def file_digest(path: str | os.PathLike, length: int = 12) -> str:
    """The first ``length`` hex digits of a file's SHA-256 (keys caches to the exact weights used)."""
    return sha256_digest(path)[:length]


def _check_state_dict(path: Path, required: tuple[str, ...], option: str = "features.weights_path") -> dict:
    """Load a state_dict with ``weights_only=True``; one-line errors for unsafe or wrong files."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure to read means a bad file
        raise ValueError(f"cannot read {path} as a plain state_dict ({type(err).__name__}); check {option}") from None
    if not isinstance(state, Mapping) or not all(k in state for k in required):
        raise ValueError(f"{path} is not the expected weights file (missing {required[0]} ...); check {option}")
    return dict(state)


def resolve_features(name: str, channels: int) -> str:
    """``auto`` -> ``classifier`` for 1-channel data, ``inception`` for RGB."""
    if name not in FEATURES:
        raise ValueError(f"unknown features={name!r}; choose one of: {', '.join(FEATURES)}")
    if name == "auto":
        return "classifier" if channels == 1 else "inception"
    return name


def build_features(
    config: Mapping[str, Any], data: Mapping[str, Any], device: torch.device | str = "cpu"
) -> FeatureExtractor:
    """The extractor a ``features`` config asks for, for the data (``conf/data``) the model was trained on.

    ``classifier`` loads the cached classifier of that dataset and image size, training it first
    when there is none (see :func:`fewstep.metrics.classifier.load_or_train`).
    """
    from fewstep.metrics.reference import data_channels

    config = dict(config)
    name = resolve_features(config.get("name", "auto"), data_channels(data))
    if name == "inception":
        extractor: FeatureExtractor = InceptionFeatures(config.get("weights_path"))
    else:
        from fewstep.metrics.classifier import load_or_train

        extractor = load_or_train(
            data,
            cache_dir=config.get("cache_dir") or "logs/cache",
            weights_path=config.get("weights_path"),
            epochs=int(config.get("epochs", 10)),
            batch_size=int(config.get("batch_size", 128)),
            lr=float(config.get("lr", 4e-3)),
            seed=int(config.get("seed", 0)),
        )
    return extractor.to(device).eval()
