"""Artifact folders: atomic writes, ``manifest.json`` and input fingerprints.

Every stage writes one folder ``RUN/<stage>/`` holding its outputs and a ``manifest.json``:

    {"stage": ..., "key": <hash of config slice + input fingerprints>, "status": "running"|"complete",
     "config": {...slice...}, "inputs": {...fingerprints...}, "outputs": {...}, "started": ..., "finished": ...}

A rerun with the same key skips a ``complete`` stage, resumes a ``running`` one (per-file outputs
already written are kept), and starts afresh when the key changed. Files are written to a temporary
name in the same folder and renamed, so a killed run never leaves a half file that looks finished.
On an object store (``RUN`` an ``s3://``… URI, see ``mars_ray.storage``) each file is one upload,
which is atomic there, but a folder "rename" would be a copy + delete of every file. So there the
artifact of key ``K`` is written under its own prefix ``RUN/<stage>/@K/`` (its own ``manifest.json``
there says running/complete), and ``RUN/<stage>/manifest.json`` is the pointer: the complete
manifest of the current artifact plus ``"current": "@K"``. ``finish`` moves the pointer (one PUT),
so a rerun of another key never touches the current artifact until it is complete, a failed or
killed rerun leaves the pointer as it was, and replacing costs O(1) requests whatever the file
count. Readers find the files through :func:`current` (which also follows a features-cache link);
local folders keep the flat layout ``RUN/<stage>/…`` and ``current`` returns them unchanged.
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
POINTER = "current"  # pointer-manifest field (object stores): the prefix holding the current artifact
PREVIOUS = "previous"  # pointer-manifest field: the prefix it replaced (kept until the next replacement)
PREFIX = "@"  # artifact prefixes RUN/<stage>/@<key> (object stores)
LINK = "link"  # manifest field of RUN/features pointing at a features-cache folder (``stages.cache``)


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
    """One stage's output folder and its manifest bookkeeping.

    ``root`` is the documented folder ``RUN/<stage>``; ``path`` is where this key's artifact is
    written: ``root`` itself on a local disk, ``root/@<key>`` on an object store (see the module
    docstring: there ``root/manifest.json`` is the pointer to the current prefix).
    """

    root: AnyPath
    stage: str
    key: str
    config: Mapping[str, Any]
    inputs: Mapping[str, Any]

    @property
    def remote(self) -> bool:
        return storage.is_uri(self.root)

    @property
    def path(self) -> AnyPath:
        """The folder this key's artifact is written to (``root``, or ``root/@<key>`` on an object store)."""
        if not self.remote:
            return self.root
        if not self.key or "/" in self.key:
            raise ValueError(f"{self.root}: stage key {self.key!r} cannot name an artifact prefix")
        return self.root / f"{PREFIX}{self.key}"

    @property
    def manifest_path(self) -> AnyPath:
        return self.path / MANIFEST

    def read_manifest(self) -> dict[str, Any] | None:
        return read_manifest(self.path)

    def is_complete(self) -> bool:
        """The folder holds the finished artifact of this key (brought back first if a killed run set it aside).

        Object store: the pointer names this key's prefix; or the prefix is complete but not current
        (a run killed between its last write and the pointer, or the artifact the last replacement
        kept): the pointer is moved to it, one PUT instead of recomputing it.
        """
        m = self.read_manifest()
        done = bool(m and m.get("key") == self.key and m.get("status") == "complete")
        if self.remote:
            if done and (read_manifest(self.root) or {}).get(POINTER) != self.path.name:
                self._point(m or {})
                logger.info("%s: the finished %s artifact of this key is current again", self.path, self.stage)
            return done
        if done:
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
        storage.rmtree(self.root)
        self.previous_path.rename(self.root)
        logger.info("%s: brought back the finished %s artifact an interrupted run had set aside", self.root, self.stage)
        return True

    @property
    def previous_path(self) -> AnyPath:
        """Local disks: where ``begin`` sets a finished artifact of another key aside (``.<stage>.prev``)."""
        return self.root.with_name(f".{self.root.name}.prev")

    def begin(self) -> bool:
        """Prepare the folder; returns True when resuming an interrupted run with the same key.

        Local: a finished folder written with another key is moved aside (``.<stage>.prev``) rather
        than deleted: ``finish`` drops it, ``restore`` (called by ``guard`` when the stage raises)
        puts it back, so bad input never destroys earlier results. An unfinished folder of another
        key is cleared. Object store: nothing outside this key's prefix is touched (an unfinished
        prefix of this key is resumed, anything else in it cleared). ``ValueError`` when ``root``
        holds files but no manifest (not a stage folder: never overwritten).
        """
        if self.remote:
            return self._begin_prefix()
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

    def _begin_prefix(self) -> bool:
        m = self.read_manifest()
        resuming = bool(m and m.get("key") == self.key and m.get("status") == "running")
        if read_manifest(self.root) is None and self.root.is_dir() and any(
                not c.name.startswith(PREFIX) for c in self.root.iterdir()):
            raise ValueError(f"{self.root} exists, is not empty and has no {MANIFEST}: refusing to overwrite it")
        if not resuming and self.path.exists():
            storage.rmtree(self.path)  # a finished prefix nobody asked ``is_complete`` about, or a stray one
        self.path.mkdir(parents=True, exist_ok=True)
        self._write("running", outputs={})
        faults.point(f"{self.stage}.begin")
        return resuming

    def restore(self) -> None:
        """Undo ``begin`` after a failure: bring back the finished artifact it moved aside.

        Object store: nothing was moved; the pointer still names the previous artifact, and this
        key's unfinished prefix stays for a rerun with the same key to resume.
        """
        if self.remote:
            logger.info("%s: the %s rerun failed; %s still names the current artifact", self.path, self.stage,
                        self.root / MANIFEST)
            return
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
        """Mark the artifact complete; on an object store also make it current and drop stale prefixes."""
        faults.point(f"{self.stage}.finish")
        manifest = self._write("complete", outputs=outputs)
        if not self.remote:
            storage.rmtree(self.previous_path)
            return
        faults.point(f"{self.stage}.pointer")
        self._point(manifest)

    def _point(self, manifest: Mapping[str, Any]) -> None:
        """Object store: ``root/manifest.json`` = this key's complete manifest + ``current`` (one PUT),
        then :func:`drop_stale` (the replaced artifact is kept until the next replacement)."""
        old = read_manifest(self.root) or {}
        previous = old.get(POINTER) if old.get(POINTER) != self.path.name else old.get(PREVIOUS)
        pointer = {**manifest, POINTER: self.path.name, PREVIOUS: previous}
        atomic_write_json(self.root / MANIFEST, pointer)
        drop_stale(self.root, legacy=bool(old) and not old.get(POINTER))

    def _write(self, status: str, outputs: Mapping[str, Any]) -> dict[str, Any]:
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
        return manifest


def drop_stale(root: AnyPath, *, legacy: bool = False) -> list[AnyPath]:
    """Delete the artifact prefixes of object-store stage folder ``root`` that the pointer keeps no more.

    Kept: the current prefix and the one it replaced (a reader that followed the pointer just
    before it moved can finish; a rerun of the previous config makes it current again for one
    PUT). Deleted: every other ``@…`` prefix (older artifacts, unfinished reruns of other keys) and,
    with ``legacy``, the files of a flat artifact written before prefixes existed. A prefix is one
    recursive delete (batched requests, not one a file). Failures are logged, not raised: the
    pointer is already right, and the next replacement tries again. Returns what was deleted.
    """
    m = read_manifest(root) or {}
    keep = {MANIFEST, m.get(POINTER), m.get(PREVIOUS)}
    dropped: list[AnyPath] = []
    try:
        for child in list(root.iterdir()):
            if child.name in keep or not (legacy or child.name.startswith(PREFIX)):
                continue
            storage.rmtree(child)
            dropped.append(child)
    except OSError as e:
        logger.warning("%s: could not delete stale artifacts (%s); the next replacement tries again", root, e)
    if dropped:
        logger.info("%s: deleted %d stale artifact entr%s", root, len(dropped), "y" if len(dropped) == 1 else "ies")
    return dropped


def current(folder: AnyPath) -> AnyPath:
    """The folder that holds the files of the stage artifact named ``folder`` (``RUN/<stage>``).

    The one way readers find an artifact. ``folder`` itself for a local stage folder, a folder
    with no manifest, or a flat artifact; ``folder/@<key>`` when its manifest is an object-store
    pointer (``"current"``); the cache folder (and its current prefix) when it is a features-cache
    link (``"link"``). Reads one manifest (one GET on an object store). ``FileNotFoundError``
    when a link's target holds no finished artifact of the linked key; ``ValueError`` for a
    pointer that names no prefix.
    """
    m = read_manifest(folder)
    if not m:
        return folder
    if m.get(LINK):
        target = storage.upath(m[LINK])  # a URI read from the manifest
        tm = read_manifest(target)
        if not tm or tm.get("status") != "complete" or tm.get("key") != m.get("key"):
            stage = m.get("stage", "features")
            raise FileNotFoundError(
                f"{folder / MANIFEST}: links to {target}, which holds no finished {stage} artifact with key "
                f"{m.get('key')} (the cache was cleared?); run `mars {stage}` again"
            )
        return current(target)
    name = m.get(POINTER)
    if not name:
        return folder
    if not (isinstance(name, str) and name.startswith(PREFIX) and "/" not in name):
        raise ValueError(f"{folder / MANIFEST}: corrupt pointer {POINTER}={name!r} (expected '{PREFIX}<key>')")
    return folder / name


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
    """``folder/manifest.json`` (``None`` when there is none; one GET on an object store)."""
    p = folder / MANIFEST
    try:
        text = p.read_text()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: corrupt manifest ({e})") from None


def require_complete(folder: AnyPath, stage: str) -> dict[str, Any]:
    """The manifest of a finished upstream stage, or a clear error telling which stage to run."""
    m = read_manifest(folder)
    if not m or m.get("status") != "complete":
        raise FileNotFoundError(f"{folder}: no finished '{stage}' stage here; run `mars {stage}` first")
    return m
