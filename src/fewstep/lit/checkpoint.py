"""Loading checkpoints safely: ``weights_only`` semantics, one-line errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fewstep.lit.module import DiffusionModel
from fewstep.utils import file_digest, load_checkpoint

__all__ = ["AtomicCheckpointIO", "load_checkpoint", "load_model"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written beside their target, synced, then renamed over it (``os.replace``).

    A crash or ``kill -9`` at any moment leaves either the previous file or the new one, never a
    truncated one, whatever filesystem ``$TMPDIR`` is on (Lightning's own writer stages the file in
    ``$TMPDIR`` and moves it, which is a copy when that is another filesystem).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


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
