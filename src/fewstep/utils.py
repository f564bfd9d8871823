"""Small helpers shared by lit/ and metrics/ (which must not import each other): files and checkpoints."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Any

import torch


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file: identifies the exact weights a cache entry (optimized grid, FID features) belongs to."""
    digest = hashlib.sha256()
    with open(Path(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``: tensors and plain data only.

    A file that would need arbitrary unpickling (and so could execute code) is refused.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError(f"checkpoint {path} is not a regular file; pass the path of a .ckpt file written by train.py")
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass the path of a .ckpt file (e.g. .../checkpoints/last.ckpt)"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"refusing to load {path}: it holds objects other than tensors and plain data ({first[:160]}); "
            "only load checkpoints written by fewstep from sources you trust"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(
            f"cannot read checkpoint {path}: it is damaged or not a torch checkpoint ({type(err).__name__})"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ValueError(
            f"{path} is not a fewstep checkpoint (no state_dict / hyper_parameters); pass a .ckpt written by train.py"
        )
    return checkpoint
