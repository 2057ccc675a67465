"""Torch files (weights, checkpoints) on a local disk or an object store: one reader, one writer.

Every model family and stage that keeps weights in a file goes through these two, so each error
names the file and says what it was meant to be (``what``), and every write is atomic. Paths may
be the strings a config or a checkpoint names (this is where they become paths) or path objects.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from mars_ray import storage
from mars_ray.storage import AnyPath


def load_torch_file(path: "str | AnyPath", what: str, *, map_location: "str | torch.device" = "cpu",
                    safe_globals: Sequence[Any] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` of a local file or an object-store URI.

    ``safe_globals``: extra classes the file may pickle (DINO checkpoints pickle ``argparse.Namespace``).
    Raises ``FileNotFoundError`` ("``{what} {path}: no such file``") and ``ValueError``
    ("``{what} {path}: cannot be read by torch.load (…)``") for anything torch cannot unpickle.
    """
    p = storage.upath(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p}: no such file")
    try:
        with storage.open_read(p) as f, torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(f, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling fails in many types; re-raised with the file name
        raise ValueError(f"{what} {p}: cannot be read by torch.load ({type(e).__name__}: {e})") from e


def save_torch_file(obj: Any, path: AnyPath) -> AnyPath:
    """``torch.save(obj)`` to ``path`` atomically (temporary name + rename locally, one upload on an
    object store); returns ``path``. ``obj`` should hold tensors and plain values only, so that
    :func:`load_torch_file` reads it back with ``weights_only=True``."""
    with storage.atomic_open(path) as f:
        torch.save(obj, f)
    return path


__all__ = ["load_torch_file", "save_torch_file"]
