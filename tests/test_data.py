"""Datasets and the DataModule: ranges, shapes, deterministic splits, folders, offline errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.lit import ImageDataModule


def test_mnist5k_default():
    dm = ImageDataModule()
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1  # padded border is black (-1)
    assert len(dm.train_set) == 4500 and len(dm.val_set) == 500
    assert set(y.tolist()) <= set(range(10))
    again = ImageDataModule()
    again.setup()
    assert again.val_set.indices == dm.val_set.indices  # the same held-out digits every run


def test_mnist5k_other_size():
    dm = ImageDataModule(image_size=16, batch_size=4)
    dm.setup()
    assert next(iter(dm.val_dataloader()))[0].shape == (4, 1, 16, 16)


def _write_images(root, n, mode, size=(40, 30)):
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / ("cats" if i % 2 else "dogs") / "deeper"
        sub.mkdir(parents=True, exist_ok=True)
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(sub / f"{i}.png")


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder(tmp_path, channels):
    _write_images(tmp_path, 6, "RGB")
    dm = ImageDataModule(
        name="folder", root=str(tmp_path), image_size=16, channels=channels, batch_size=3, val_fraction=0.34
    )
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (3, channels, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert set(y.tolist()) <= {0, 1}
    assert len(dm.train_set) == 4 and len(dm.val_set) == 2


def test_empty_and_unreadable_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageDataModule(name="folder", root=str(tmp_path), image_size=16).setup()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        ImageDataModule(name="folder", root=str(tmp_path), image_size=16).setup()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageDataModule(name="folder", root=str(tmp_path / "missing"), image_size=16).setup()


def test_torchvision_set_offline_error(tmp_path):
    dm = ImageDataModule(name="cifar10", root=str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError, match="use data=mnist5k") as err:
        dm.setup()
    assert "\n" not in str(err.value)


def test_bad_options():
    with pytest.raises(ValueError, match="choose one of"):
        ImageDataModule(name="imagenet")
    with pytest.raises(ValueError, match="remove data.channels"):
        ImageDataModule(name="mnist5k", channels=3)
