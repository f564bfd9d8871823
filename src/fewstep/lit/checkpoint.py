"""Loading checkpoints safely: ``weights_only`` semantics, one-line errors."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from fewstep.lit.module import DiffusionModel
from fewstep.utils import file_digest


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


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> DiffusionModel:
    """A :class:`DiffusionModel` rebuilt from a checkpoint's hyper-parameters and weights."""
    path = Path(path)
    checkpoint = load_checkpoint(path, map_location)
    try:
        model = DiffusionModel(**checkpoint["hyper_parameters"])
    except TypeError as err:  # (a bad text_encoder.path etc. raises its own one-line ValueError)
        raise ValueError(f"{path} has hyper-parameters this fewstep version does not know ({err})") from None
    missing, unexpected = model.load_state_dict(checkpoint["state_dict"], strict=False)
    if not model.strict_loading:  # a frozen text encoder (CLIP) is loaded from its own folder
        missing = [k for k in missing if not k.startswith("text_encoder.")]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the network its hyper-parameters describe "
            f"({len(missing)} missing, {len(unexpected)} unexpected weights, e.g. {(missing + unexpected)[0]})"
        )
    model.sigmas_cache = path.parent / f"{path.stem}.optimized_sigmas.json"
    model.checkpoint_id = file_digest(path)
    return model.to(map_location).eval()
