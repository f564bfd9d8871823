"""A small CNN classifier trained on the model's own dataset: FID/KID features and IS logits for MNIST-like data.

Inception-v3 features (Heusel et al. 2017) describe natural RGB photographs; on 28x28 digits they
mostly measure resizing artefacts. The common remedy (e.g. the MNIST FIDs of many diffusion and
GAN papers) is a classifier trained on the dataset itself: its penultimate layer gives the
features of FID (Heusel et al. 2017) and KID (Binkowski et al. 2018), its logits the class
posteriors of the Inception Score (Salimans et al. 2016).

The classifier is trained on the datamodule's train split (the images the diffusion model saw),
tested on held-out images (torchvision's test split where there is one, else the datamodule's
val split), and cached as a plain ``state_dict`` (``torch.load(weights_only=True)``) per dataset,
split and image size, with a JSON file of its test accuracy beside it. It trains on first use;
to train (or retrain) it explicitly::

    python -m fewstep.metrics.classifier --data mnist5k --image-size 32     # ~10 s on a CPU
    python -m fewstep.metrics.classifier --ckpt logs/train/runs/.../checkpoints/last.ckpt --force
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset

from fewstep.data import TORCHVISION_SETS, ImageFolderDataset
from fewstep.metrics.features import FeatureExtractor, _check_state_dict, file_digest
from fewstep.metrics.reference import data_channels, dataset_id, make_datamodule, split_id

log = logging.getLogger(__name__)
FEATURE_DIM = 128


class SmallCNN(nn.Module):
    """Three 3x3 conv + BatchNorm + ReLU stages (stride 2), a 2x2 average pool, a 128-d ReLU layer, a linear head.

    ~0.15M parameters; about 1 s per MNIST-5k epoch on one CPU core.
    """

    def __init__(self, channels: int, num_classes: int, image_size: int, width: int = 32) -> None:
        super().__init__()
        first_stride = 2 if image_size >= 32 else 1

        def stage(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *stage(channels, width, first_stride),
            *stage(width, 2 * width, 2),
            *stage(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * width, FEATURE_DIM),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(FEATURE_DIM, num_classes)
        self.channels, self.num_classes, self.image_size = channels, num_classes, image_size

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(penultimate features [B, 128], logits [B, num_classes])``."""
        features = self.body(x)
        return features, self.head(self.dropout(features))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], image_size: int) -> SmallCNN:
        """Rebuild the network from its weights (their shapes give channels, width and classes)."""
        conv = state["body.0.weight"]
        net = cls(int(conv.shape[1]), int(state["head.weight"].shape[0]), image_size, int(conv.shape[0]))
        net.load_state_dict(state)
        return net


class ClassifierFeatures(FeatureExtractor):
    """:class:`SmallCNN` as a feature extractor: 128-d penultimate features, logits over the dataset's classes."""

    num_features = FEATURE_DIM

    def __init__(self, net: SmallCNN, name: str, fingerprint: str = "") -> None:
        super().__init__()
        self.net = net.eval()
        self.net.requires_grad_(False)
        self.num_classes = net.num_classes
        self.name, self.fingerprint = name, fingerprint

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        shape = (self.net.channels, self.net.image_size, self.net.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != shape:
            raise ValueError(
                f"{self.name} takes images of shape [B, {', '.join(map(str, shape))}], got {tuple(images.shape)}: "
                "the classifier must be trained on the model's dataset and image size"
            )
        return self.net(images.float())


# ------------------------------------------------------------------------------------- datasets
def dataset_labels(dataset: Dataset) -> Tensor:
    """All labels of a dataset without loading its images (Subset, TensorDataset, torchvision, folders)."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, ConcatDataset):
        return torch.cat([dataset_labels(d) for d in dataset.datasets])
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].long()
    if isinstance(dataset, ImageFolderDataset):
        return torch.tensor([_folder_label(dataset, path) for path in dataset.files], dtype=torch.long)
    if hasattr(dataset, "targets"):
        return torch.as_tensor(dataset.targets).long()
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])  # type: ignore[arg-type]


def _folder_label(dataset: ImageFolderDataset, path: Path) -> int:
    parts = path.relative_to(dataset.root).parts
    return dataset.class_index.get(parts[0], 0) if len(parts) > 1 else 0


def held_out(datamodule: Any) -> tuple[Dataset, str]:
    """The images the classifier is tested on: torchvision's test split, else the datamodule's val split."""
    if datamodule.name in TORCHVISION_SETS:
        return datamodule.full_dataset(train=False), "test"
    if datamodule.val_set is None:
        raise ValueError(
            f"data={datamodule.name} holds out no images to test the classifier on; set data.val_fraction > 0"
        )
    return datamodule.val_set, "val"


@torch.no_grad()
def accuracy(net: nn.Module, dataset: Dataset, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``net`` (returning ``(features, logits)``) on a dataset of ``(image, label)``."""
    net.eval()
    device = next(net.parameters()).device
    correct = total = 0
    for images, labels in DataLoader(dataset, batch_size=batch_size):
        _, logits = net(images.to(device))
        correct += int((logits.argmax(1).cpu() == labels).sum())
        total += len(labels)
    return correct / max(total, 1)


# ------------------------------------------------------------------------------------- training
def train_classifier(
    data: Mapping[str, Any],
    *,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 4e-3,
    seed: int = 0,
    width: int = 32,
    device: torch.device | str = "cpu",
) -> tuple[SmallCNN, dict[str, Any]]:
    """Train :class:`SmallCNN` on the train split of ``data``; returns it and a report (test accuracy, time).

    AdamW with a one-cycle learning rate, random shifts of up to 1/16 of the image side (and
    horizontal flips when the data config asks for them). Deterministic for a given ``seed``.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(
            f"classifier training needs epochs >= 1, batch_size >= 1, lr > 0 (got {epochs}, {batch_size}, {lr})"
        )
    datamodule = make_datamodule(data)
    train_set = datamodule.train_set
    test_set, test_split = held_out(datamodule)
    labels = dataset_labels(train_set)
    num_classes = int(labels.max()) + 1
    if num_classes < 2:
        raise ValueError(
            f"data={datamodule.name} has a single class: a classifier cannot be trained; use features=inception"
        )
    size, channels = datamodule.image_size, data_channels(data)
    torch.manual_seed(seed)
    net = SmallCNN(channels, num_classes, size, width).to(device)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        train_set,
        batch_size=min(batch_size, len(train_set)),
        shuffle=True,
        drop_last=True,
        generator=generator,
        num_workers=int(data.get("num_workers") or 0),
    )
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * len(loader), pct_start=0.2)
    flip = bool(data.get("random_flip", False))
    shift = max(1, size // 16)
    start = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        for images, targets in loader:
            x = _augment(images.to(device), shift, flip, generator)
            _, logits = net(x)
            loss = F.cross_entropy(logits, targets.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"the classifier's loss became {loss.item()}; lower features.lr (now {lr})")
        log.info("classifier epoch %d/%d: loss %.4f", epoch + 1, epochs, loss.item())
    seconds = time.perf_counter() - start
    net.eval()
    report = {
        "features": classifier_name(data),
        "test_accuracy": accuracy(net, test_set),
        "test_split": test_split,
        "test_images": len(test_set),
        "train_images": len(train_set),
        "num_classes": num_classes,
        "epochs": epochs,
        "seconds": seconds,
    }
    return net.cpu(), report


def _augment(x: Tensor, shift: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Random translation by up to ``shift`` pixels (background padding), one offset per batch; optional flips."""
    size_h, size_w = x.shape[-2:]
    dy, dx = torch.randint(0, 2 * shift + 1, (2,), generator=generator).tolist()
    x = F.pad(x, (shift, shift, shift, shift), value=-1.0)[..., dy : dy + size_h, dx : dx + size_w]
    if flip:
        mask = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


def classifier_name(data: Mapping[str, Any]) -> str:
    """What summaries report, e.g. ``classifier:mnist5k-32``."""
    return f"classifier:{dataset_id(data)}-{int(data.get('image_size', 32))}"


def classifier_path(data: Mapping[str, Any], cache_dir: str | os.PathLike) -> Path:
    """``<cache_dir>/features/classifier-<dataset>-<split>-<size>px.pt``."""
    size = int(data.get("image_size", 32))
    return Path(cache_dir) / "features" / f"classifier-{dataset_id(data)}-{split_id(data, 'train')}-{size}px.pt"


def load_or_train(
    data: Mapping[str, Any],
    *,
    cache_dir: str | os.PathLike = "logs/cache",
    weights_path: str | os.PathLike | None = None,
    force: bool = False,
    **train_options: Any,
) -> ClassifierFeatures:
    """The cached classifier of ``data`` (trained when missing, or with ``force``), or the one at ``weights_path``."""
    size = int(data.get("image_size", 32))
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"features.weights_path={path} does not exist; pass a classifier state_dict .pt")
    else:
        path = classifier_path(data, cache_dir)
        if force or not path.is_file():
            log.info("training the feature classifier for %s (cache: %s)", classifier_name(data), path)
            with torch.random.fork_rng(devices=[]):  # leave the caller's random stream (e.g. a training run) as it was
                net, report = train_classifier(data, **train_options)
            _save_atomic(net.state_dict(), path)
            path.with_suffix(".json").write_text(json.dumps(report, indent=2))
            log.info(
                "classifier %s: test accuracy %.4f on %d %s images (%.1f s)",
                report["features"],
                report["test_accuracy"],
                report["test_images"],
                report["test_split"],
                report["seconds"],
            )
    state = _check_state_dict(path, required=("body.0.weight", "head.weight"))
    try:
        net = SmallCNN.from_state_dict(state, size)
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit fewstep's SmallCNN ({str(err).splitlines()[0][:100]})") from None
    if net.channels != data_channels(data):
        raise ValueError(f"{path} was trained on {net.channels}-channel images, the data has {data_channels(data)}")
    return ClassifierFeatures(net, classifier_name(data), file_digest(path))


def _save_atomic(state: Mapping[str, Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(dict(state), tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fewstep.metrics.classifier",
        description="Train (or load from the cache) the feature classifier of a dataset and report its test accuracy.",
    )
    parser.add_argument("--data", default="mnist5k", help="dataset name, as in conf/data (default: mnist5k)")
    parser.add_argument("--root", default="data", help="where torchvision sets / image folders lie (default: data)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=None, help="image folders only: 1 or 3")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="the datamodule's held-out share")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--ckpt", default=None, help="take the data config from a fewstep checkpoint instead")
    parser.add_argument("--cache-dir", default="logs/cache", help="cache root (paths.cache_dir; default: logs/cache)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="retrain even when a cached classifier exists")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.ckpt:
        from fewstep.utils import load_checkpoint

        data = load_checkpoint(args.ckpt)["hyper_parameters"].get("data")
        if not data:
            raise ValueError(f"{args.ckpt} records no data config; pass --data/--image-size instead")
    else:
        data = {
            "name": args.data,
            "root": args.root,
            "image_size": args.image_size,
            "channels": args.channels,
            "val_fraction": args.val_fraction,
            "split_seed": args.split_seed,
        }
    options = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
    extractor = load_or_train(data, cache_dir=args.cache_dir, force=args.force, **options)
    test_set, test_split = held_out(make_datamodule(data))
    report = {
        "features": extractor.name,
        "weights": str(classifier_path(data, args.cache_dir)),
        "test_accuracy": accuracy(extractor.net, test_set),
        "test_split": test_split,
        "test_images": len(test_set),
    }
    print(json.dumps(report, indent=2))
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from fewstep.config import cli

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return cli(run)(parse_args(argv))


if __name__ == "__main__":
    main()
