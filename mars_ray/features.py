"""USS pixel embeddings F for one image, whatever produced them (Sec 3.1).

Two sources behind one interface, so the ``features`` and ``debias`` stages never care which:

* a registered extractor (``mars_ray.models.registry.FEATURES``: the built-in ``texture`` filter bank,
  a learned ``stego`` model, …) run on the image;
* an external folder with one file per image id (``{id}.npy``, ``.npz`` or ``.pt``; ``[d, h, w]``)
  written by any USS method: a local folder or an object-store URI (``s3://bucket/feats``, see
  ``mars_ray.storage``), listed once rather than probed file by file.

Either way F is upsampled bilinearly to the label's size, as STEGO and MARS do.
"""

from __future__ import annotations

import logging
import os
from typing import IO, Any, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn.functional as nnf

from mars_ray import storage
from mars_ray.storage import AnyPath

PathLike = Union[str, "os.PathLike[str]", storage.ObjectPath]

logger = logging.getLogger(__name__)

FEATURE_SUFFIXES = (".npy", ".npz", ".pt")


def upsample(features: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[d, h, w]`` → ``[d, H, W]`` float32, bilinear (align_corners=False)."""
    t = torch.as_tensor(np.asarray(features, dtype=np.float32) if isinstance(features, np.ndarray) else features)
    t = t.float()
    if tuple(t.shape[1:]) != tuple(size):
        t = nnf.interpolate(t[None], size=size, mode="bilinear", align_corners=False)[0]
    return t.numpy()


def find_feature_file(folder: AnyPath, image_id: str, listing: Optional[Mapping[str, Any]] = None) -> AnyPath:
    """``{folder}/{id}.npy|.npz|.pt`` (first match in that order); ``FileNotFoundError`` naming the id.

    ``listing``: the folder's file names (``storage.list_files``), so a caller looking up many ids
    lists the folder once instead of probing up to three names per id.
    """
    for suffix in FEATURE_SUFFIXES:
        name = f"{image_id}{suffix}"
        if (name in listing) if listing is not None else (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"{folder}: no feature file for image {image_id!r} (looked for {', '.join(image_id + s for s in FEATURE_SUFFIXES)})"
    )


_HEAD_BYTES = 16384  # one ranged read holds any ordinary .npy header (a longer one reads on)


def _open_head(path: AnyPath) -> IO[bytes]:
    """A reader that fetches only the first bytes it is asked for (no whole-object download)."""
    if isinstance(path, storage.ObjectPath):
        return path.fs.open_input_stream(path.fs_path, compression=None, buffer_size=_HEAD_BYTES)
    return storage.open_read(path)


def feature_file_shape(path: AnyPath) -> tuple[int, ...] | None:
    """The array shape from a ``.npy`` header (no data read); ``None`` for other formats."""
    if path.suffix != ".npy":
        return None
    try:
        with _open_head(path) as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, _ = read_header(f)
    except Exception as e:  # noqa: BLE001 - any header problem is a bad file
        raise ValueError(f"{path}: not a readable .npy file ({e})") from None
    return tuple(shape)


def check_feature_folder(folder: AnyPath, ids: list[str]) -> None:
    """Before a stage starts: every id has a feature file, and ``.npy`` headers agree on ``[d, h, w]``.

    The folder is listed once; on an object store the headers (first bytes of each ``.npy``) are
    read many at a time. ``.npz``/``.pt`` files are checked when read (their shape needs a full
    load). Raises ``FileNotFoundError``/``ValueError`` naming the folder or the first bad file.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: features folder does not exist")
    listing = storage.list_files(folder)
    paths = [find_feature_file(folder, image_id, listing) for image_id in ids]
    npy = [p for p in paths if p.suffix == ".npy"]
    shapes = storage.map_reads(feature_file_shape, npy, remote=storage.is_uri(folder))
    dim, first = None, None
    for path, shape in zip(npy, shapes):
        if len(shape) != 3:
            raise ValueError(f"{path}: features must have shape [d, h, w], got {shape}")
        if dim is None:
            dim, first = shape[0], path
        elif shape[0] != dim:
            raise ValueError(f"{path}: feature dimension {shape[0]} differs from {dim} in {first.name}")


def load_feature_file(path: AnyPath) -> np.ndarray:
    """Read one external feature file (local or object store) → float32 ``[d, h, w]``.

    ``.npz`` takes the array named ``features`` (or the only array); ``.pt`` a tensor or a dict
    with ``features``. Any float dtype is accepted (``mars dump-features`` writes float16) and
    converted. Raises ``ValueError`` naming the file for a wrong rank or NaN/inf values.
    """
    try:
        arr = _read_array(path)
    except Exception as e:  # corrupt files fail in many ways (zip, pickle, OSError, ValueError)
        if isinstance(e, ValueError) and str(path) in str(e):
            raise
        raise ValueError(f"{path}: cannot read features ({type(e).__name__}: {e})") from None
    if arr.ndim != 3:
        raise ValueError(f"{path}: features must have shape [d, h, w], got {tuple(arr.shape)}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{path}: features contain NaN or inf")
    return arr


def _read_array(path: AnyPath) -> np.ndarray:
    if path.suffix not in FEATURE_SUFFIXES:
        raise ValueError(f"{path}: unknown feature file type (use {', '.join(FEATURE_SUFFIXES)})")
    with storage.open_read(path) as f:
        if path.suffix == ".npy":
            return np.load(f, allow_pickle=False)
        if path.suffix == ".npz":
            with np.load(f, allow_pickle=False) as z:
                names = list(z.keys())
                key = "features" if "features" in names else (names[0] if len(names) == 1 else None)
                if key is None:
                    raise ValueError(f"{path}: .npz holds {names}; name the array 'features'")
                return z[key]
        obj = torch.load(f, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        if "features" not in obj:
            raise ValueError(f"{path}: .pt dict has no 'features' entry (keys: {sorted(obj)[:10]})")
        obj = obj["features"]
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path}: expected a tensor, got {type(obj).__name__}")
    return obj.float().numpy()


class FeatureSource:
    """Embeddings F ``[d, H, W]`` of one image, upsampled to ``(H, W)``.

    ``features_dir`` non-empty → external files; otherwise the registry extractor ``extractor``
    built with ``extractor_kwargs`` (e.g. ``{"checkpoint": path}``). ``dim`` is checked to stay the
    same across images (``ValueError`` naming the file that differs). Built inside Ray actors:
    ``features_dir`` may arrive as the string Ray was sent, and becomes a path here.
    """

    def __init__(
        self,
        *,
        extractor: str = "texture",
        extractor_kwargs: dict[str, Any] | None = None,
        features_dir: PathLike = "",
        device: str = "cpu",
    ) -> None:
        self.features_dir = storage.upath(features_dir) if features_dir else None
        self._listing: Optional[dict[str, Any]] = None  # object stores: the folder, listed once
        self.device = torch.device(device)
        self.dim: int | None = None
        self.model = None
        if self.features_dir is None:
            from mars_ray.models import load_all
            from mars_ray.models.registry import FEATURES

            load_all()
            self.model = FEATURES.get(extractor, **(extractor_kwargs or {}))
            if hasattr(self.model, "to"):
                self.model = self.model.to(self.device)
            if hasattr(self.model, "eval"):
                self.model.eval()
            self.dim = int(self.model.dim)
        elif not self.features_dir.is_dir():
            raise FileNotFoundError(f"{self.features_dir}: features folder does not exist")
        elif storage.is_uri(self.features_dir):
            self._listing = storage.list_files(self.features_dir)

    def describe(self) -> str:
        return f"external:{self.features_dir}" if self.features_dir else type(self.model).__name__

    def __call__(self, image_id: str, image: np.ndarray) -> np.ndarray:
        """``image`` uint8 ``[H, W, 3]`` → F float32 ``[d, H, W]``."""
        return upsample(self.native(image_id, image), image.shape[:2])

    @torch.no_grad()
    def native(self, image_id: str, image: np.ndarray) -> np.ndarray:
        """F at the source's own resolution: float32 ``[d, h, w]`` (what ``mars dump-features`` stores)."""
        if self.features_dir is not None:
            path = find_feature_file(self.features_dir, image_id, self._listing)
            feats: Any = load_feature_file(path)
            where = str(path)
        else:
            x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
            x = x.permute(2, 0, 1)[None].float().div_(255.0)
            feats = self.model(x)[0].float().cpu()
            where = f"extractor output for {image_id}"
        d = int(feats.shape[0])
        if self.dim is None:
            self.dim = d
        elif d != self.dim:
            raise ValueError(f"{where}: feature dimension {d} differs from the {self.dim} seen before")
        fh, fw = feats.shape[1:]
        if fh < 1 or fw < 1:
            raise ValueError(f"{where}: empty feature map {fh}x{fw}")
        return np.asarray(feats, dtype=np.float32)
