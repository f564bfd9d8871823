"""Inpainting masks (1 = fill, 0 = keep): the standard synthetic ones and masks read from image files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

MASKS = ("center", "half", "random")
GREY_SHARE = 0.01  # a mask file with more grey (neither black nor white) pixels than this is not a mask


def center_mask(size: int) -> Tensor:
    """A centred square of half the side (a quarter of the pixels)."""
    mask = torch.zeros(size, size)
    mask[size // 4 : size - size // 4, size // 4 : size - size // 4] = 1
    return mask


def half_mask(size: int) -> Tensor:
    """The bottom half."""
    mask = torch.zeros(size, size)
    mask[size // 2 :] = 1
    return mask


def stroke_mask(size: int, seed: int, strokes: tuple[int, int] = (2, 4), width: float = 0.12) -> Tensor:
    """Random brush strokes (free-form masks in the spirit of Yu et al. 2019): a few random walks
    of 3-6 segments, painted ``width * size`` wide; one seed gives one mask."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size] + 0.5
    mask = np.zeros((size, size), dtype=bool)
    radius = max(1.0, width * size / 2)
    for _ in range(rng.integers(strokes[0], strokes[1] + 1)):
        point = rng.uniform(0.15, 0.85, 2) * size
        angle = rng.uniform(0, 2 * math.pi)
        for _ in range(rng.integers(3, 7)):
            angle += rng.uniform(-1.2, 1.2)
            step = rng.uniform(0.15, 0.35) * size
            end = np.clip(point + step * np.array([math.sin(angle), math.cos(angle)]), 0, size)
            for t in np.linspace(0, 1, 16):
                centre = point + t * (end - point)
                mask |= (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2
            point = end
    return torch.from_numpy(mask.astype(np.float32))


def make_masks(kind: str, n: int, size: int, seed: int = 0) -> Tensor:
    """``n`` masks ``[n, 1, size, size]`` of a kind in :data:`MASKS`; ``random`` differs per image
    (image i's mask depends on (seed, i) only)."""
    if kind == "center":
        mask = center_mask(size).expand(n, 1, size, size)
    elif kind == "half":
        mask = half_mask(size).expand(n, 1, size, size)
    elif kind == "random":
        mask = torch.stack([stroke_mask(size, seed * 1_000_003 + i) for i in range(n)])[:, None]
    else:
        raise ValueError(f"unknown mask {kind!r}: use one of {', '.join(MASKS)} or the path of a mask image")
    return mask.contiguous()


def load_mask(path: str | Path, size: tuple[int, int] | None = None, resize: bool = False) -> Tensor:
    """A mask image (white = fill, black = keep) as ``[1, 1, H, W]``, thresholded at 0.5. A file with
    many grey pixels is refused: it is likely an image, not a mask."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"mask={path} is neither one of {', '.join(MASKS)} nor an image file")
    with Image.open(path) as img:
        grey = img.convert("L")
        if size is not None and grey.size != (size[1], size[0]):
            if not resize:
                raise ValueError(
                    f"mask {path} is {grey.size[1]}x{grey.size[0]} but the images are {size[0]}x{size[1]}; "
                    "give one of their size or resize=true"
                )
            grey = grey.resize((size[1], size[0]), Image.NEAREST)
        values = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)
    share = float(((values > 0.1) & (values < 0.9)).float().mean())
    if share > GREY_SHARE:
        raise ValueError(
            f"mask {path} is not binary after thresholding at 0.5: {share:.0%} of its pixels are grey; "
            "give a black (keep) / white (fill) image"
        )
    return (values > 0.5).float()[None, None]
