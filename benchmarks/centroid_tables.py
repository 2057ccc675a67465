"""Synthetic centroid tables at COCO and Open-Images size for ``scale_bench.py``'s ``select`` rows.

Rows follow the ``features`` stage exactly where it matters to ``select``: the schema
(``stages.features.table_schema``), the file layout (``stages.features.write_table_file``: files
of ``ROWS_PER_FILE`` rows, background first, row groups of ``ROW_GROUP_ROWS``) and the mix of rows
per image (K_bg = 2 background rows and K_fg = 2 rows for each of 1-3 classes: ~7 rows an image,
as COCO's ~600k rows for 82k images). Vectors are Gaussian; the background shares a direction.
A run folder around the table holds a finished ``features`` manifest and a dataset root with the
class names, so the real ``select`` stage runs on it unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mars_ray.artifacts import MANIFEST, atomic_write_json
from mars_ray.stages import features


def dataset_root(folder: Path, classes: int) -> Path:
    """A dataset root that ``VOCDataset`` opens: an empty ``JPEGImages/`` and ``classes.txt``."""
    (folder / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (folder / "classes.txt").write_text("\n".join(["background"] + [f"class{c:03d}" for c in range(1, classes + 1)]) + "\n")
    return folder


def _rows(first_image: int, n_images: int, d: int, classes: int, rng: np.random.Generator) -> pa.Table:
    n_cls = rng.integers(1, 4, size=n_images)  # 1-3 classes an image
    per_image = 2 + 2 * n_cls
    image = np.repeat(np.arange(first_image, first_image + n_images), per_image)
    start = np.repeat(np.cumsum(per_image) - per_image, per_image)
    pos = np.arange(image.size) - start  # 0,1 background; then two per class
    is_bg = pos < 2
    which = np.maximum(pos - 2, 0) // 2
    base = rng.integers(1, classes + 1, size=n_images)
    cls = np.where(is_bg, 0, (np.repeat(base, per_image) + which * 7 - 1) % classes + 1).astype(np.int16)
    vec = rng.standard_normal((image.size, d), dtype=np.float32)
    vec[is_bg] += 0.5  # a shared background direction
    n = image.size
    return pa.table(
        {
            "image_id": pc.cast(pa.array(image), pa.string()),
            "class_id": pa.array(cls),
            "is_bg": pa.array(is_bg),
            "k": pa.array((pos % 2).astype(np.int16)),
            "count": pa.array(rng.integers(50, 5000, size=n)),
            "gt_match": pa.array(rng.random(n, dtype=np.float32)),
            "gt_iou": pa.array(rng.random(n, dtype=np.float32)),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), d),
        },
        schema=features.table_schema(d),
    )


class GrowingTable:
    """A centroid table under ``RUN/features/centroids.parquet`` that grows file by file."""

    def __init__(self, run: Path, d: int, classes: int, seed: int = 0) -> None:
        self.run, self.d, self.classes = run, d, classes
        self.folder = run / "features" / features.TABLE
        shutil.rmtree(run, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self.rng = np.random.default_rng(seed)
        self.rows = self.images = self.files = 0

    @property
    def bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("*.parquet"))

    def grow_to(self, rows: int) -> None:
        """Append files until the table holds at least ``rows`` rows."""
        while self.rows < rows:
            want = min(features.ROWS_PER_FILE, rows - self.rows)
            n_images = max(1, want // 6)  # ~6 rows an image on average
            t = _rows(self.images, n_images, self.d, self.classes, self.rng)
            features.write_table_file(t, str(self.folder / f"part-synthetic-{self.files:06d}.parquet"))
            self.rows += t.num_rows
            self.images += n_images
            self.files += 1

    def mark_finished(self) -> None:
        """A finished ``features`` manifest whose key names this size (a new size → select reruns)."""
        atomic_write_json(self.run / "features" / MANIFEST, {
            "stage": "features", "key": f"synthetic-d{self.d}-rows{self.rows}", "status": "complete", "config": {},
            "inputs": {}, "outputs": {"table": features.TABLE, "rows": self.rows, "dim": self.d},
            "started": None, "finished": None})
        shutil.rmtree(self.run / "select", ignore_errors=True)
