"""Loading checkpoints safely: ``weights_only`` semantics, one-line errors."""

from __future__ import annotations

from pathlib import Path

import torch

from fewstep.lit.module import DiffusionModel
from fewstep.utils import file_digest, load_checkpoint

__all__ = ["load_checkpoint", "load_model"]


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> DiffusionModel:
    """A :class:`DiffusionModel` rebuilt from a checkpoint's hyper-parameters and weights."""
    path = Path(path)
    checkpoint = load_checkpoint(path, map_location)
    try:
        model = DiffusionModel(**checkpoint["hyper_parameters"])
    except TypeError as err:  # (a bad text_encoder.path etc. raises its own one-line ValueError)
        raise ValueError(f"{path} has hyper-parameters this fewstep version does not know ({err})") from None
    missing, unexpected = model.load_state_dict(checkpoint["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the network its hyper-parameters describe "
            f"({len(missing)} missing, {len(unexpected)} unexpected weights, e.g. {(missing + unexpected)[0]})"
        )
    model.sigmas_cache = path.parent / f"{path.stem}.optimized_sigmas.json"
    model.checkpoint_id = file_digest(path)
    return model.to(map_location).eval()
