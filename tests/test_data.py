"""Datasets and the DataModule: ranges, shapes, deterministic splits, folders, offline errors."""

from __future__ import annotations

import json

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


def _write_metadata(root, lines):
    (root / "metadata.jsonl").write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    )


def _captioned_folder(root):
    _write_images(root, 4, "L", size=(12, 12))
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    _write_metadata(root, [{"file_name": n, "text": f"picture {n.split('/')[-1][0]}"} for n in names])
    return names


def test_image_folder_captions(tmp_path):
    names = _captioned_folder(tmp_path)
    assert names == ["cats/deeper/1.png", "cats/deeper/3.png", "dogs/deeper/0.png", "dogs/deeper/2.png"]
    options = {"name": "folder", "root": str(tmp_path), "image_size": 8, "channels": 1, "batch_size": 2}
    dm = ImageDataModule(**options, val_fraction=0.25, captions=True)
    dm.setup()
    x, y, captions = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 1, 8, 8) and len(captions) == 2
    for label, caption in zip(y.tolist(), captions, strict=True):  # dogs (label 1) are the even files
        assert label == (1 if int(caption.split()[-1]) % 2 == 0 else 0)
    assert (
        isinstance(dm.train_captions(), list)
        and len(dm.train_captions()) == 3
        and all(c.startswith("picture ") for c in dm.train_captions())
    )
    assert dm.num_classes == 2 and dm.class_frequencies().sum().item() == pytest.approx(1.0)
    plain = ImageDataModule(**options)
    plain.setup()
    assert len(next(iter(plain.train_dataloader()))) == 2  # no captions asked for: (image, label)


def test_flat_folder_has_no_classes(tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    Image.new("L", (8, 8)).save(tmp_path / "b.png")
    dm = ImageDataModule(name="folder", root=str(tmp_path), image_size=8, channels=1, val_fraction=0)
    assert dm.num_classes is None and dm.class_frequencies().tolist() == [1.0]


@pytest.mark.parametrize(
    ("line", "error", "match"),
    [
        ("{not json", ValueError, r"metadata.jsonl line 2 is not JSON"),
        ('["a list"]', ValueError, r"metadata.jsonl line 2 is not a JSON object"),
        ({"file_name": "cats/deeper/1.png"}, ValueError, r'metadata.jsonl line 2 has no "text" string'),
        ({"text": "a cat"}, ValueError, r'metadata.jsonl line 2 has no "file_name" string'),
        ({"file_name": "cats/9.png", "text": "a cat"}, FileNotFoundError, r"line 2: file_name 'cats/9.png' does not"),
        ({"file_name": "metadata.jsonl", "text": "a cat"}, FileNotFoundError, r"line 2: .* is not an image"),
        ({"file_name": "./dogs/deeper/0.png", "text": "again"}, ValueError, r"line 2: 'dogs/deeper/0.png' is listed"),
    ],
)
def test_image_folder_metadata_errors(tmp_path, line, error, match):
    names = _captioned_folder(tmp_path)
    lines = [{"file_name": "dogs/deeper/0.png", "text": "a dog"}, line] + [
        {"file_name": n, "text": "x"} for n in names if n != "dogs/deeper/0.png"
    ]
    _write_metadata(tmp_path, lines)
    with pytest.raises(error, match=match) as err:
        ImageDataModule(name="folder", root=str(tmp_path), image_size=8, captions=True).setup()
    assert "\n" not in str(err.value)


def test_image_folder_missing_metadata_and_captions(tmp_path):
    _write_images(tmp_path, 5, "L", size=(12, 12))
    with pytest.raises(FileNotFoundError, match="needs .*metadata.jsonl .* or set data.captions=false") as err:
        ImageDataModule(name="folder", root=str(tmp_path), image_size=8, captions=True).setup()
    assert "\n" not in str(err.value)
    _write_metadata(tmp_path, ["", {"file_name": "dogs/deeper/0.png", "text": "a dog"}, ""])
    with pytest.raises(ValueError, match=r"no caption for 4 image\(s\): cats/deeper/1.png, .* and 1 more; add a line"):
        ImageDataModule(name="folder", root=str(tmp_path), image_size=8, captions=True).setup()


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
