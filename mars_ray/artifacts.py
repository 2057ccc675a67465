"""Artifact folders: atomic writes, ``manifest.json`` and input fingerprints.

Every stage writes one folder ``RUN/<stage>/`` holding its outputs and a ``manifest.json``:

    {"stage": ..., "key": <hash of config slice + input fingerprints>, "status": "running"|"complete",
     "config": {...slice...}, "inputs": {...fingerprints...}, "outputs": {...}, "started": ..., "finished": ...}

A rerun with the same key skips a ``complete`` stage, resumes a ``running`` one (per-file outputs
already written are kept), and starts afresh when the key changed. Files are written to a temporary
name in the same folder and renamed, so a killed run never leaves a half file that looks finished.
On an object store (``RUN`` an ``s3://``… URI, see ``mars_ray.storage``) each file is one upload,
which is atomic there, and a folder "rename" is a copy + delete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from mars_ray import faults, storage
from mars_ray.storage import AnyPath

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def atomic_write_bytes(path: AnyPath, data: bytes) -> None:
    with storage.atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: AnyPath, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: AnyPath, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_save_npy(path: AnyPath, array: np.ndarray) -> None:
    with storage.atomic_open(path) as f:
        np.save(f, array)


@contextmanager
def provisional(path: AnyPath, write: Callable[[], None]) -> Iterator[None]:
    """``write()`` a file for the block; if the block raises, the file's previous bytes come back.

    For ``RUN/config.yaml``: it names the config of the command now running, and again the one of
    the artifacts in ``RUN`` when that command fails. A file that did not exist stays as written
    (it tells what was tried).
    """
    previous = path.read_bytes() if path.is_file() else None
    write()
    try:
        yield
    except BaseException:
        if previous is not None:
            atomic_write_bytes(path, previous)
        raise


def load_npy(path: AnyPath) -> np.ndarray:
    """``np.load`` of a local or object-store ``.npy`` (no pickles)."""
    with storage.open_read(path) as f:
        return np.load(f, allow_pickle=False)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (Path, storage.ObjectPath)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def fingerprint_files(paths: Iterable[AnyPath]) -> str:
    """Cheap content fingerprint of a file list: names, sizes and mtimes (not the bytes)."""
    stats: list[tuple[str, Any]] = []
    listings: dict[Any, dict[str, Any]] = {}  # object stores: one listing a folder, not a request a file
    for p in paths:
        if storage.is_uri(p):
            if p.parent not in listings:
                listings[p.parent] = storage.list_files(p.parent)
            st = listings[p.parent].get(p.name)
            if st is None:
                raise FileNotFoundError(f"{p}: no such file")
        else:
            st = p.stat()
        stats.append((p.name, st))
    return _fingerprint_stats(stats)


def _fingerprint_stats(stats: list[tuple[str, Any]]) -> str:
    h = hashlib.sha256()
    for name, st in stats:
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"{len(stats)}:{h.hexdigest()[:16]}"


def fingerprint_path(p: AnyPath | None) -> str:
    """Fingerprint of one file, or of every file below a folder (``None``, an input not given → "none")."""
    if p is None:
        return "none"
    if p.is_file():
        return fingerprint_files([p])
    if p.is_dir():
        if storage.is_uri(p):  # one recursive listing, not a request a file
            files = sorted(storage.walk_files(p), key=lambda qs: str(qs[0]))
            return _fingerprint_stats([(q.name, st) for q, st in files if not q.name.startswith(".")])
        return fingerprint_files(sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")))
    raise FileNotFoundError(f"{p} does not exist")


@dataclass
class StageDir:
    """One stage's output folder and its manifest bookkeeping."""

    path: AnyPath
    stage: str
    key: str
    config: Mapping[str, Any]
    inputs: Mapping[str, Any]

    @property
    def manifest_path(self) -> AnyPath:
        return self.path / MANIFEST

    def read_manifest(self) -> dict[str, Any] | None:
        return read_manifest(self.path)

    def is_complete(self) -> bool:
        """The folder holds the finished artifact of this key (brought back first if a killed run set it aside)."""
        m = self.read_manifest()
        if m and m.get("key") == self.key and m.get("status") == "complete":
            return True
        return self._recover(m)

    def _recover(self, m: dict[str, Any] | None) -> bool:
        """A run of another key killed after ``begin`` set this key's finished artifact aside
        (``.<stage>.prev``): put it back instead of recomputing it. ``True`` when it did."""
        prev = read_manifest(self.previous_path)
        if not (prev and prev.get("key") == self.key and prev.get("status") == "complete"):
            return False
        if m is not None and m.get("status") == "complete":  # a finished artifact of another key: not ours to drop
            return False
        storage.rmtree(self.path)
        self.previous_path.rename(self.path)
        logger.info("%s: brought back the finished %s artifact an interrupted run had set aside", self.path, self.stage)
        return True

    @property
    def previous_path(self) -> AnyPath:
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
            storage.rmtree(self.previous_path)
            if m is not None and m.get("status") == "complete":
                self.path.rename(self.previous_path)
            else:
                storage.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        if resuming:
            _drop_temporaries(self.path)
        self._write("running", outputs={})
        faults.point(f"{self.stage}.begin")
        return resuming

    def restore(self) -> None:
        """Undo ``begin`` after a failure: bring back the finished artifact it moved aside."""
        if self.previous_path.exists():
            storage.rmtree(self.path)
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
        faults.point(f"{self.stage}.finish")
        self._write("complete", outputs=outputs)
        storage.rmtree(self.previous_path)

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


def _drop_temporaries(folder: AnyPath) -> None:
    """Temporary files of ``storage.atomic_open`` a killed writer left behind (never under a final name)."""
    if storage.is_uri(folder):
        return  # uploads are atomic: an object store keeps no half file
    stale = [p for p in folder.rglob(".*.tmp-*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        logger.info("%s: removed %d temporary files of an interrupted run", folder, len(stale))


def read_manifest(folder: AnyPath) -> dict[str, Any] | None:
    p = folder / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: corrupt manifest ({e})") from None


def require_complete(folder: AnyPath, stage: str) -> dict[str, Any]:
    """The manifest of a finished upstream stage, or a clear error telling which stage to run."""
    m = read_manifest(folder)
    if not m or m.get("status") != "complete":
        raise FileNotFoundError(f"{folder}: no finished '{stage}' stage here; run `mars {stage}` first")
    return m
