"""Artifact folders: atomic writes, ``manifest.json`` and input fingerprints.

Every stage writes one folder ``RUN/<stage>/`` holding its outputs and a ``manifest.json``:

    {"stage": ..., "key": <hash of config slice + input fingerprints>, "status": "running"|"complete",
     "config": {...slice...}, "inputs": {...fingerprints...}, "outputs": {...}, "started": ..., "finished": ...}

A rerun with the same key skips a ``complete`` stage, resumes a ``running`` one (per-file outputs
already written are kept), and starts afresh when the key changed. Files are written to a temporary
name in the same folder and renamed, so a killed run never leaves a half file that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def fingerprint_files(paths: Iterable[Path]) -> str:
    """Cheap content fingerprint of a file list: names, sizes and mtimes (not the bytes)."""
    h = hashlib.sha256()
    n = 0
    for p in paths:
        st = os.stat(p)
        h.update(f"{Path(p).name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        n += 1
    return f"{n}:{h.hexdigest()[:16]}"


def fingerprint_path(path: str | Path) -> str:
    """Fingerprint of one file, or of every file below a folder ("" → "none")."""
    if not path:
        return "none"
    p = Path(path)
    if p.is_file():
        return fingerprint_files([p])
    if p.is_dir():
        return fingerprint_files(sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")))
    raise FileNotFoundError(f"{p} does not exist")


@dataclass
class StageDir:
    """One stage's output folder and its manifest bookkeeping."""

    path: Path
    stage: str
    key: str
    config: Mapping[str, Any]
    inputs: Mapping[str, Any]

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def read_manifest(self) -> dict[str, Any] | None:
        return read_manifest(self.path)

    def is_complete(self) -> bool:
        m = self.read_manifest()
        return bool(m and m.get("key") == self.key and m.get("status") == "complete")

    @property
    def previous_path(self) -> Path:
        return self.path.with_name(f".{self.path.name}.prev")

    def begin(self) -> bool:
        """Prepare the folder; returns True when resuming an interrupted run with the same key.

        A finished folder written with another key is moved aside (``.<stage>.prev``) rather than
        deleted: ``finish`` drops it, ``restore`` (called by ``guard`` when the stage raises) puts
        it back, so bad input never destroys earlier results. An unfinished folder of another
        key is cleared.
        """
        m = self.read_manifest()
        resuming = bool(m and m.get("key") == self.key and m.get("status") == "running")
        if self.path.exists() and not resuming:
            if m is None and any(self.path.iterdir()):
                raise ValueError(
                    f"{self.path} exists, is not empty and has no {MANIFEST}: refusing to overwrite it"
                )
            shutil.rmtree(self.previous_path, ignore_errors=True)
            if m is not None and m.get("status") == "complete":
                self.path.rename(self.previous_path)
            else:
                shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._write("running", outputs={})
        return resuming

    def restore(self) -> None:
        """Undo ``begin`` after a failure: bring back the finished artifact it moved aside."""
        if self.previous_path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
            self.previous_path.rename(self.path)
            logger.info("%s: restored the previous %s artifact after the failure", self.path, self.stage)

    @contextmanager
    def guard(self) -> Iterator[bool]:
        """``with sd.guard() as resuming:`` = ``begin``, then ``restore`` if the body raises."""
        resuming = self.begin()
        try:
            yield resuming
        except BaseException:
            self.restore()
            raise

    def finish(self, outputs: Mapping[str, Any]) -> None:
        self._write("complete", outputs=outputs)
        shutil.rmtree(self.previous_path, ignore_errors=True)

    def _write(self, status: str, outputs: Mapping[str, Any]) -> None:
        prev = self.read_manifest() or {}
        manifest = {
            "stage": self.stage,
            "key": self.key,
            "status": status,
            "config": dict(self.config),
            "inputs": dict(self.inputs),
            "outputs": dict(outputs),
            "started": prev.get("started") if prev.get("key") == self.key else None,
            "finished": None,
        }
        manifest["started"] = manifest["started"] or time.strftime("%Y-%m-%dT%H:%M:%S")
        if status == "complete":
            manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_json(self.manifest_path, manifest)


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    p = Path(folder) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: corrupt manifest ({e})") from None


def require_complete(folder: str | Path, stage: str) -> dict[str, Any]:
    """The manifest of a finished upstream stage, or a clear error telling which stage to run."""
    m = read_manifest(folder)
    if not m or m.get("status") != "complete":
        raise FileNotFoundError(f"{folder}: no finished '{stage}' stage here; run `mars {stage}` first")
    return m
