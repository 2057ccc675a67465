"""``ObjectPath``: a file or folder on an object store, with the ``pathlib.Path`` subset stages use.

``/``, ``name``, ``parent``, ``exists``, ``is_file``, ``is_dir``, ``iterdir``, ``rglob``,
``read_bytes``, ``write_bytes``, ``mkdir``, ``rename``, ``unlink``, ``stat``… over a
``pyarrow.fs`` filesystem: ``s3://``, ``gs://``, ``hdfs://`` natively, and any other ``fsspec``
protocol through ``PyFileSystem(FSSpecHandler)``. Credentials and endpoints come from the
filesystem's usual environment, so a URI stays a plain string that pickles to Ray workers.
``mars_ray.storage`` is the API stage code uses; this module is its object-store half.
"""

from __future__ import annotations

import fnmatch
import io
import os
import posixpath
import threading
from dataclasses import dataclass
from typing import IO, Any, Iterator
from urllib.parse import urlsplit

# -- filesystems ---------------------------------------------------------------------------------

_FS_CACHE: dict[tuple[str, str], tuple[Any, str]] = {}
_FS_LOCK = threading.Lock()


def _filesystem(scheme: str, netloc: str) -> tuple[Any, str]:
    """``(pyarrow FileSystem, base path)`` for ``scheme://netloc``, built once per process."""
    key = (scheme, netloc)
    with _FS_LOCK:
        if key not in _FS_CACHE:
            import pyarrow.fs as pafs

            uri = f"{scheme}://{netloc}/" if netloc else f"{scheme}:///"
            try:
                fs, base = pafs.FileSystem.from_uri(uri)
            except (ValueError, OSError, TypeError) as arrow_error:
                try:
                    import fsspec
                    from pyarrow.fs import FSSpecHandler, PyFileSystem

                    fsspec_fs = fsspec.filesystem(scheme)
                except (ImportError, ValueError) as e:
                    raise ValueError(
                        f"{uri}: no filesystem for {scheme}:// (pyarrow: {arrow_error}; fsspec: {e})"
                    ) from None
                fs = PyFileSystem(FSSpecHandler(fsspec_fs))
                base = fsspec_fs._strip_protocol(uri) if netloc else ""
            _FS_CACHE[key] = (fs, base.rstrip("/"))
        return _FS_CACHE[key]


@dataclass(frozen=True)
class _Stat:
    st_size: int
    st_mtime_ns: int


class ObjectPath:
    """A file or folder on an object store or remote filesystem, named by its URI.

    Immutable and hashable; pickles as the URI (the filesystem is rebuilt lazily per process).
    Has no ``__fspath__``, so passing one to ``open`` or a library that wants a local file fails
    loudly instead of writing to a stray local path: use ``open_read``/``atomic_open``.
    """

    __slots__ = ("scheme", "netloc", "key")

    def __init__(self, uri: str) -> None:
        split = urlsplit(uri)
        if not split.scheme or split.scheme == "file":
            raise ValueError(f"{uri}: not an object-store URI")
        if split.query or split.fragment:
            raise ValueError(
                f"{uri}: query strings are not supported in paths; configure the filesystem through its "
                "environment (e.g. AWS_ENDPOINT_URL, AWS_REGION)"
            )
        object.__setattr__(self, "scheme", split.scheme)
        object.__setattr__(self, "netloc", split.netloc)
        key = posixpath.normpath("/" + split.path).lstrip("/") if split.path.strip("/") else ""
        object.__setattr__(self, "key", key)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("ObjectPath is immutable")

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (ObjectPath, (str(self),))

    # -- naming ----------------------------------------------------------------------------------
    def __str__(self) -> str:
        return f"{self.scheme}://{self.netloc}/{self.key}" if self.key else f"{self.scheme}://{self.netloc}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and str(self) == str(other)

    def __lt__(self, other: "ObjectPath") -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, other: "str | os.PathLike[str]") -> "ObjectPath":
        rel = os.fspath(other).strip("/")
        return ObjectPath(f"{self.scheme}://{self.netloc}/{posixpath.join(self.key, rel)}")

    def joinpath(self, *parts: str) -> "ObjectPath":
        out = self
        for part in parts:
            out = out / part
        return out

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def parent(self) -> "ObjectPath":
        return ObjectPath(f"{self.scheme}://{self.netloc}/{posixpath.dirname(self.key)}")

    def with_name(self, name: str) -> "ObjectPath":
        return self.parent / name

    def with_suffix(self, suffix: str) -> "ObjectPath":
        return self.parent / (self.stem + suffix)

    def resolve(self) -> "ObjectPath":
        return self

    absolute = expanduser = resolve

    def as_uri(self) -> str:
        return str(self)

    # -- the filesystem --------------------------------------------------------------------------
    @property
    def fs(self) -> Any:
        return _filesystem(self.scheme, self.netloc)[0]

    @property
    def fs_path(self) -> str:
        base = _filesystem(self.scheme, self.netloc)[1]
        return posixpath.join(base, self.key) if base else (self.key or "/")

    def _info(self) -> Any:
        return self.fs.get_file_info(self.fs_path)

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.Directory

    def is_symlink(self) -> bool:
        return False

    def stat(self) -> _Stat:
        import pyarrow.fs as pafs

        info = self._info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{self}: no such file or folder")
        return _Stat(st_size=int(info.size or 0), st_mtime_ns=int(info.mtime_ns or 0))

    def _children(self, recursive: bool) -> list[Any]:
        import pyarrow.fs as pafs

        if not self.is_dir():
            raise FileNotFoundError(f"{self}: no such folder")
        return self.fs.get_file_info(pafs.FileSelector(self.fs_path, recursive=recursive))

    def _from_fs_path(self, fs_path: str) -> "ObjectPath":
        rel = posixpath.relpath(fs_path, self.fs_path)
        return self / rel

    def iterdir(self) -> Iterator["ObjectPath"]:
        for info in self._children(recursive=False):
            yield self._from_fs_path(info.path)

    def glob(self, pattern: str) -> Iterator["ObjectPath"]:
        """Children whose name matches ``pattern`` (one level; ``**`` is not supported, use ``rglob``)."""
        if "/" in pattern:
            raise ValueError(f"{self}: glob pattern {pattern!r} must not contain '/'")
        for child in self.iterdir():
            if fnmatch.fnmatchcase(child.name, pattern):
                yield child

    def rglob(self, pattern: str) -> Iterator["ObjectPath"]:
        """Files and folders at any depth below this folder whose name matches ``pattern``."""
        for info in self._children(recursive=True):
            if fnmatch.fnmatchcase(posixpath.basename(info.path), pattern):
                yield self._from_fs_path(info.path)

    def mkdir(self, parents: bool = False, exist_ok: bool = False, mode: int = 0o777) -> None:
        if self.exists():
            if not exist_ok:
                raise FileExistsError(f"{self}: already exists")
            return
        self.fs.create_dir(self.fs_path, recursive=True)

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.fs_path) as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self}: no such file") from None

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        with self.fs.open_output_stream(self.fs_path) as f:
            f.write(data)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def open(self, mode: str = "rb", encoding: str | None = None) -> IO[Any]:
        """``rb``/``r``: the whole object in memory; ``wb``/``w``: uploaded once on a clean close."""
        if mode in ("r", "rb"):
            raw = io.BytesIO(self.read_bytes())
            return raw if mode == "rb" else io.TextIOWrapper(raw, encoding=encoding or "utf-8")
        if mode in ("w", "wb"):
            up = _Upload(self)
            return up if mode == "wb" else io.TextIOWrapper(up, encoding=encoding or "utf-8")
        raise ValueError(f"{self}: unsupported open mode {mode!r}")

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.fs_path)
        except FileNotFoundError:
            if not missing_ok:
                raise FileNotFoundError(f"{self}: no such file") from None

    def rmdir(self) -> None:
        self.fs.delete_dir(self.fs_path)

    def rename(self, target: "ObjectPath | str") -> "ObjectPath":
        """Move a file (server-side copy + delete) or a whole folder (copy of each file + delete)."""
        if isinstance(target, str):
            target = ObjectPath(target)
        if not isinstance(target, ObjectPath) or (target.scheme, target.netloc) != (self.scheme, self.netloc):
            raise ValueError(f"{self}: cannot rename across filesystems to {target}")
        if self.is_dir():
            import pyarrow.fs as pafs

            pafs.copy_files(self.fs_path, target.fs_path, source_filesystem=self.fs,
                            destination_filesystem=self.fs)
            self.fs.delete_dir(self.fs_path)
        else:
            self.fs.move(self.fs_path, target.fs_path)
        return target

    replace = rename


class _Upload(io.BytesIO):
    """A write buffer that becomes the object on a clean ``close`` (nothing is written on error)."""

    def __init__(self, target: ObjectPath) -> None:
        super().__init__()
        self._target = target
        self._failed = False

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        self._failed = exc_type is not None
        self.close()

    def close(self) -> None:
        if not self.closed and not self._failed:
            self._target.write_bytes(self.getvalue())
        super().close()


__all__ = ["ObjectPath"]
