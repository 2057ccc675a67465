"""The storage layer: the same calls on a local folder and on an S3 bucket (moto server)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from mars_ray import storage
from mars_ray.artifacts import StageDir, atomic_save_npy, atomic_write_json, current, fingerprint_files, load_npy
from mars_ray.artifacts import read_manifest
from mars_ray.data.label_io import read_label, write_label
from mars_ray.storage import ObjectPath, upath


def test_upath_kinds_and_naming():
    assert isinstance(upath("runs/x"), Path)
    assert upath("file:///tmp/a/b") == Path("/tmp/a/b")
    p = upath("s3://bkt/run//a/")
    assert isinstance(p, ObjectPath) and str(p) == "s3://bkt/run/a"
    q = p / "debias" / "x.png"
    assert str(q) == "s3://bkt/run/a/debias/x.png"
    assert (q.name, q.stem, q.suffix) == ("x.png", "x", ".png")
    assert q.parent.parent == p and str(q.with_suffix(".npy")) == "s3://bkt/run/a/debias/x.npy"
    assert str(upath("s3://bkt")) == "s3://bkt" and str(upath("s3://bkt") / "k") == "s3://bkt/k"
    assert pickle.loads(pickle.dumps(q)) == q and hash(q) == hash(upath(str(q)))
    assert storage.absolute("s3://bkt/run") == "s3://bkt/run"
    assert storage.absolute("rel") == str(Path("rel").resolve())
    with pytest.raises(ValueError, match="query strings"):
        upath("s3://bkt/run?endpoint_override=x")
    with pytest.raises(TypeError):
        open(q)  # no __fspath__: never silently a local file


def test_unknown_scheme_is_named():
    with pytest.raises(ValueError, match="nosuchfs://"):
        upath("nosuchfs://x/y").exists()


@pytest.fixture(params=["local", "s3", "memory"])
def root(request, tmp_path):
    if request.param == "local":
        return tmp_path / "store"
    if request.param == "memory":  # an fsspec-only protocol, through pyarrow's FSSpecHandler
        import uuid

        return upath(f"memory://mars-test-{uuid.uuid4().hex[:8]}")
    return upath(request.getfixturevalue("s3_bucket")) / "store"


def test_same_behaviour_on_every_filesystem(root):
    a = root / "a"
    a.mkdir(parents=True, exist_ok=True)
    (a / "x.txt").write_text("hello")
    (a / "sub").mkdir(parents=True, exist_ok=True)
    (a / "sub" / "y.bin").write_bytes(b"\0\1")
    assert (a / "x.txt").is_file() and a.is_dir() and not (a / "nope").exists()
    assert (a / "x.txt").read_text() == "hello" and (a / "x.txt").stat().st_size == 5
    assert sorted(p.name for p in a.iterdir()) == ["sub", "x.txt"]
    assert sorted(p.name for p in a.rglob("*.bin")) == ["y.bin"]
    assert set(storage.list_files(a)) == {"x.txt"}

    with storage.atomic_open(a / "x.txt") as f:
        f.write(b"new")
    assert (a / "x.txt").read_bytes() == b"new"
    with pytest.raises(RuntimeError):
        with storage.atomic_open(a / "x.txt") as f:
            f.write(b"half")
            raise RuntimeError("killed mid-write")
    assert (a / "x.txt").read_bytes() == b"new"  # untouched, and no stray temporary file
    assert set(storage.list_files(a)) == {"x.txt"}

    b = storage.move(a, root / "b")
    assert not a.exists() and (b / "sub" / "y.bin").read_bytes() == b"\0\1"
    storage.rmtree(b)
    assert not b.exists()
    storage.rmtree(b)  # a missing folder is fine
    with pytest.raises(FileNotFoundError, match="x.txt"):
        (root / "x.txt").read_bytes()


def test_rmtree_ignores_only_not_found(tmp_path: Path, monkeypatch):
    """A delete that fails for any other reason raises (it used to be swallowed and surface later)."""
    import errno
    import os

    folder = tmp_path / "old"
    (folder / "sub").mkdir(parents=True)
    for name in ("busy.png", "gone.png", "ok.png"):
        (folder / "sub" / name).write_bytes(b"x")
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        name = os.fsdecode(path).rsplit("/", 1)[-1]
        if name == "gone.png":  # removed by someone else meanwhile: fine
            real_unlink(path, *args, **kwargs)
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", name)
        if name == "busy.png":
            raise PermissionError(errno.EACCES, "Permission denied", name)
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(PermissionError, match="busy.png"):
        storage.rmtree(folder)
    assert (folder / "sub" / "busy.png").exists()
    monkeypatch.setattr(os, "unlink", real_unlink)
    storage.rmtree(folder)
    assert not folder.exists()


def test_artifacts_and_labels_on_s3(s3_bucket):
    run = upath(s3_bucket) / "run"
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    atomic_save_npy(run / "select" / "c.npy", arr)
    np.testing.assert_array_equal(load_npy(run / "select" / "c.npy"), arr)
    lab = np.array([[0, 1, 254], [255, 2, 0]], np.uint8)
    write_label(run / "debias" / "img.png", lab)
    np.testing.assert_array_equal(read_label(run / "debias" / "img.png"), lab)
    with pytest.raises(ValueError, match=r"s3://.*/bad\.png: cannot read image"):
        (run / "bad.png").write_bytes(b"not a png")
        read_label(run / "bad.png")
    fp = fingerprint_files([run / "debias" / "img.png"])
    assert fp.startswith("1:") and fp == fingerprint_files([run / "debias" / "img.png"])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        fingerprint_files([run / "debias" / "missing.png"])


def test_stage_dir_keeps_previous_artifact_on_object_store(s3_bucket):
    path = upath(s3_bucket) / "run" / "select"
    first = StageDir(path, "select", "key-1", {}, {})
    with first.guard():
        atomic_write_json(first.path / "report.json", {"v": 1})
        first.finish({"n": 1})
    second = StageDir(path, "select", "key-2", {}, {})
    with pytest.raises(ValueError, match="bad input"):
        with second.guard():
            atomic_write_json(second.path / "report.json", {"v": 2})
            raise ValueError("bad input")
    m = read_manifest(path)
    assert m["key"] == "key-1" and m["status"] == "complete"
    assert (current(path) / "report.json").read_text().count('"v": 1') == 1
    assert not second.previous_path.exists()


def test_folder_fingerprint_on_s3_is_one_listing_and_tracks_changes(s3_bucket):
    from mars_ray.artifacts import fingerprint_path

    folder = upath(s3_bucket) / "weights"
    (folder / "a.pt").write_bytes(b"1")
    (folder / "sub" / "b.pt").write_bytes(b"22")
    (folder / ".hidden").write_bytes(b"x")
    first = fingerprint_path(folder)
    assert first.startswith("2:") and fingerprint_path(folder) == first
    (folder / "sub" / "b.pt").write_bytes(b"333")
    assert fingerprint_path(folder) != first
    files = storage.walk_files(folder)
    assert sorted(q.name for q, _ in files) == [".hidden", "a.pt", "b.pt"]
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_label(folder / "nope.png")
