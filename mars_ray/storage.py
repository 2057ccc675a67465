"""Where artifacts and datasets live: local paths or object-store URIs, behind one path API.

A path is converted once, where it enters (the CLI, ``tune``, ``demo``, a Ray actor's ``__init__``,
a config value — ``stages.inputs.config_path``), with ``upath``: ``upath("runs/x")`` is a
``pathlib.Path``, ``upath("s3://bucket/run")`` an ``ObjectPath`` (``mars_ray.object_path``: the
subset of ``pathlib.Path`` the stages use, over a ``pyarrow.fs`` filesystem). ``file://`` URIs are
local paths; query strings are refused. Inside, code passes these typed paths (``AnyPath``), and
sends Ray the absolute string of one (``absolute``), which names it from any process.

The helpers below take either kind of path object (a plain string is refused with ``TypeError``, so
a URI can never be mistaken for a local folder name), so stage code is written once:

- ``open_read(p)`` / ``atomic_open(p)``: binary file objects. ``atomic_open`` writes a local file to
  a temporary name and renames it; on an object store it uploads once, on a clean ``close`` (a PUT
  is atomic: readers see the old object or the new one, never half of it). An exception inside
  the ``with`` block leaves the destination untouched in both cases.
- ``rmtree``, ``move`` (a folder move on an object store is copy + delete: stage artifacts never move
  there, ``artifacts.StageDir`` writes them under a prefix and moves a pointer), ``list_files``,
  ``walk_files``, ``map_reads`` (threaded reads for latency-bound object stores).
- ``arrow_fs(p)``: ``(pyarrow filesystem, path)`` for ``pyarrow.dataset`` and Ray Data;
  ``ray_storage(p)``: the ``storage_path``/``storage_filesystem`` pair for Ray Train and Tune.
"""

from __future__ import annotations

import errno
import os
import posixpath
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Union
from urllib.parse import urlsplit

from mars_ray.object_path import ObjectPath, _Stat, _Upload

__all__ = [
    "AnyPath", "ObjectPath", "absolute", "arrow_fs", "atomic_open", "is_uri", "list_files", "map_reads", "move",
    "open_read", "ray_storage", "rmtree", "upath", "walk_files",
]  # fmt: skip

AnyPath = Union[Path, ObjectPath]


def is_uri(p: Any) -> bool:
    """True for an object-store URI (``scheme://…``); ``file://`` URIs and plain paths are local."""
    if isinstance(p, ObjectPath):
        return True
    s = str(p)
    return "://" in s and not s.startswith("file://")


def upath(p: "str | os.PathLike[str] | ObjectPath") -> "AnyPath":
    """A ``pathlib.Path`` for a local path (or ``file://`` URI), an ``ObjectPath`` for any other URI."""
    if isinstance(p, (ObjectPath, Path)):
        return p
    s = os.fspath(p)
    if s.startswith("file://"):
        return Path(urlsplit(s).path)
    if "://" in s:
        return ObjectPath(s)
    return Path(s)


def absolute(p: "str | os.PathLike[str] | ObjectPath") -> str:
    """A string that names ``p`` from any process and working directory (for keys and workers)."""
    q = upath(p)
    return str(q) if isinstance(q, ObjectPath) else str(q.expanduser().resolve())


def _typed(p: AnyPath) -> AnyPath:
    """``p`` itself; a string is refused (it would be read as a local path even when it is a URI)."""
    if not isinstance(p, (Path, ObjectPath)):
        raise TypeError(f"{p!r}: expected a Path or ObjectPath; convert a string once, where it enters, with storage.upath")
    return p


# -- helpers for either kind ---------------------------------------------------------------------


def open_read(p: AnyPath) -> IO[bytes]:
    """A seekable binary reader (a local file, or the object's bytes in memory)."""
    q = _typed(p)
    return q.open("rb") if isinstance(q, ObjectPath) else open(q, "rb")


@contextmanager
def atomic_open(p: AnyPath) -> Iterator[IO[bytes]]:
    """``with atomic_open(path) as f: …``: ``path`` appears complete on success, untouched on error.

    Local: the bytes go to ``.{name}.tmp-{pid}-{random}`` in the same folder, then ``os.replace``.
    Object store: one upload when the block ends cleanly. Parent folders are created. A full disk
    (``ENOSPC``, ``EDQUOT``, ``EFBIG``) raises an ``OSError`` naming ``path`` (the OS names no file
    on a failed write), the temporary file removed and ``path`` as it was.
    """
    q = _typed(p)
    if isinstance(q, ObjectPath):
        up = _Upload(q)
        try:
            yield up
        except BaseException:
            up._failed = True
            up.close()
            raise
        up.close()
        return
    q.parent.mkdir(parents=True, exist_ok=True)
    tmp = q.with_name(f".{q.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, q)
    except OSError as e:
        if e.errno in _DISK_FULL and not e.filename:
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(q)) from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def rmtree(p: AnyPath) -> None:
    """Delete a folder (or a file, or a link) and everything below it.

    Only "not found" is ignored — a missing folder, or an entry that vanished while deleting; any
    other failure (permission, a busy mount, an object store refusing) raises, so a stale artifact
    never survives silently to confuse a later step.
    """
    q = _typed(p)
    if isinstance(q, ObjectPath):
        import pyarrow.fs as pafs

        kind = q._info().type
        if kind == pafs.FileType.Directory:
            q.fs.delete_dir(q.fs_path)
        elif kind == pafs.FileType.File:
            q.unlink(missing_ok=True)
        return
    if q.is_symlink() or q.is_file():
        q.unlink(missing_ok=True)
    elif q.is_dir():
        shutil.rmtree(q, onerror=_raise_unless_missing)


def _raise_unless_missing(func: Callable[..., Any], path: str, exc_info: Any) -> None:
    """``shutil.rmtree`` error handler: an entry already gone is fine, anything else raises."""
    if not issubclass(exc_info[0], FileNotFoundError):
        raise exc_info[1]


def move(src: AnyPath, dst: AnyPath) -> AnyPath:
    """Rename a file or folder; ``dst`` must not exist. On an object store this copies then deletes."""
    return _typed(src).rename(_typed(dst))


def list_files(p: AnyPath) -> dict[str, _Stat]:
    """Name → size and mtime of every file directly in folder ``p``: one listing, not a stat a file.

    On an object store this is a few LIST requests for thousands of files, where per-file checks
    would be one request each. ``FileNotFoundError`` when the folder does not exist.
    """
    q = _typed(p)
    if isinstance(q, ObjectPath):
        import pyarrow.fs as pafs

        return {posixpath.basename(i.path): _Stat(int(i.size or 0), int(i.mtime_ns or 0))
                for i in q._children(recursive=False) if i.type == pafs.FileType.File}
    if not q.is_dir():
        raise FileNotFoundError(f"{q}: no such folder")
    out: dict[str, _Stat] = {}
    for e in os.scandir(q):
        if e.is_file():
            st = e.stat()
            out[e.name] = _Stat(st.st_size, st.st_mtime_ns)
    return out


def walk_files(p: AnyPath) -> list[tuple[AnyPath, _Stat]]:
    """Every file at any depth below folder ``p`` with its size and mtime, in one recursive listing."""
    q = _typed(p)
    if isinstance(q, ObjectPath):
        import pyarrow.fs as pafs

        return [(q._from_fs_path(i.path), _Stat(int(i.size or 0), int(i.mtime_ns or 0)))
                for i in q._children(recursive=True) if i.type == pafs.FileType.File]
    out: list[tuple[AnyPath, _Stat]] = []
    for f in q.rglob("*"):
        if f.is_file():
            st = f.stat()
            out.append((f, _Stat(st.st_size, st.st_mtime_ns)))
    return out


def map_reads(fn: Callable[[Any], Any], items: Iterable[Any], *, remote: bool, workers: int = 32) -> Iterator[Any]:
    """``map(fn, items)``, but ``workers`` at a time on threads when ``remote`` (latency-bound reads
    from an object store). Results come in order, and an exception surfaces at its item, as with ``map``.
    """
    if not remote:
        return map(fn, items)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return pool.map(fn, items)


def arrow_fs(p: AnyPath) -> tuple[Any, str]:
    """``(pyarrow.fs.FileSystem, path)`` for ``pyarrow.dataset``, Parquet writers and Ray Data."""
    q = _typed(p)
    if isinstance(q, ObjectPath):
        return q.fs, q.fs_path
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem(), str(q.expanduser().resolve())


def ray_storage(p: AnyPath) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig`` / ``ray.tune.RunConfig``.

    A local path is made absolute (Train changes its workers' working directory); a URI Ray can
    resolve itself goes as is; an fsspec-only protocol passes its wrapped filesystem.
    """
    q = _typed(p)
    if not isinstance(q, ObjectPath):
        return str(q.expanduser().resolve()), None
    import pyarrow.fs as pafs

    fs = q.fs
    if isinstance(fs, pafs.PyFileSystem):
        return q.fs_path, fs
    return str(q), None
