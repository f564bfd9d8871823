"""Small helpers shared by lit/ and metrics/ (which must not import each other)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file: identifies the exact weights a cache entry (optimized grid, FID features) belongs to."""
    digest = hashlib.sha256()
    with open(Path(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
