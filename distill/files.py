"""Files written with the user's umask: some writers (safetensors' atomic save) create them 0600, which hides a
shared run's weights from its group; distill leaves permissions to the user, as `open()` would."""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """chmod every file under `path` (or `path` itself) to 0666 & ~umask, as a plain `open(..., "w")` creates it."""
    path = Path(path)
    mode = 0o666 & ~current_umask()
    for file in [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file()):
        os.chmod(file, mode)
