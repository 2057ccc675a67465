"""Object-store artifacts under ``RUN/<stage>/@<key>/`` with a pointer manifest (moto S3 server).

A rerun of another key writes beside the current artifact, ``finish`` moves the pointer (a
constant number of requests whatever the file count), a failed or killed rerun leaves the pointer
as it was, the same key resumes its prefix, and local folders keep the flat layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mars_ray import storage
from mars_ray.artifacts import MANIFEST, StageDir, atomic_write_bytes, atomic_write_json, current, read_manifest
from mars_ray.storage import upath


def _labels(sd: StageDir, n: int, tag: str) -> None:
    for i in range(n):
        atomic_write_bytes(sd.path / f"{i:05d}.png", f"{tag}-{i}".encode())
    atomic_write_json(sd.path / "stats.json", {"tag": tag})


def _produce(root, key: str, n: int, tag: str) -> StageDir:
    sd = StageDir(root, "debias", key, {"alpha": key}, {})
    with sd.guard():
        _labels(sd, n, tag)
        sd.finish({"n": n})
    return sd


def _children(root) -> set[str]:
    return {c.name for c in root.iterdir()}


def test_rerun_writes_beside_the_current_artifact_and_moves_the_pointer(s3_bucket):
    root = upath(s3_bucket) / "run" / "debias"
    first = _produce(root, "k1", 3, "one")
    assert first.path == root / "@k1" and _children(root) == {MANIFEST, "@k1"}
    m = read_manifest(root)
    assert (m["current"], m["key"], m["status"], m["outputs"]) == ("@k1", "k1", "complete", {"n": 3})
    assert current(root) == root / "@k1" and (current(root) / "00001.png").read_bytes() == b"one-1"
    assert first.is_complete()

    second = _produce(root, "k2", 3, "two")
    assert _children(root) == {MANIFEST, "@k1", "@k2"}  # the replaced one is kept until the next replacement
    m = read_manifest(root)
    assert (m["current"], m["previous"], m["key"]) == ("@k2", "@k1", "k2")
    assert json.loads((current(root) / "stats.json").read_text()) == {"tag": "two"}
    assert second.is_complete()

    _produce(root, "k3", 3, "three")
    assert _children(root) == {MANIFEST, "@k2", "@k3"}  # older than the previous one: deleted
    assert read_manifest(root)["previous"] == "@k2"


def test_failed_rerun_leaves_the_pointer_and_the_same_key_resumes(s3_bucket):
    root = upath(s3_bucket) / "run" / "debias"
    _produce(root, "k1", 4, "one")
    pointer = (root / MANIFEST).read_bytes()
    second = StageDir(root, "debias", "k2", {}, {})
    with pytest.raises(RuntimeError, match="killed half-way"):
        with second.guard() as resuming:
            assert not resuming
            atomic_write_bytes(second.path / "00000.png", b"two-0")
            raise RuntimeError("killed half-way")
    assert (root / MANIFEST).read_bytes() == pointer  # not one byte of the pointer changed
    assert current(root) == root / "@k1" and (current(root) / "00000.png").read_bytes() == b"one-0"
    assert read_manifest(second.path)["status"] == "running"  # kept for a resume
    assert not second.is_complete()

    again = StageDir(root, "debias", "k2", {}, {})
    with again.guard() as resuming:
        assert resuming  # same key → same prefix → what was written is kept
        assert storage.list_files(again.path)["00000.png"].st_size == len(b"two-0")
        atomic_write_bytes(again.path / "00001.png", b"two-1")
        again.finish({"n": 2})
    assert current(root) == root / "@k2" and read_manifest(root)["previous"] == "@k1"


def test_killed_before_the_pointer_moved_and_switch_back_cost_one_put(s3_bucket, s3_requests):
    root = upath(s3_bucket) / "run" / "select"
    _produce(root, "k1", 2, "one")
    # killed after the prefix was complete but before the pointer moved (``S.pointer``)
    sd = StageDir(root, "debias", "k2", {"alpha": "k2"}, {})
    with sd.guard():
        _labels(sd, 2, "two")
        sd._write("complete", {"n": 2})
    assert current(root) == root / "@k1"
    with s3_requests() as got:
        assert sd.is_complete()  # the finished prefix is made current, not recomputed
    assert current(root) == root / "@k2" and got.count("PUT") == 1  # one upload (one part): the pointer
    # a rerun of the previous config: its kept artifact becomes current again, one PUT
    with s3_requests() as got:
        assert StageDir(root, "debias", "k1", {"alpha": "k1"}, {}).is_complete()
    assert current(root) == root / "@k1" and got.count("PUT") == 1 and got.count("POST", where="?delete") == 0
    assert not [t for _, t in got if ".png" in t]
    assert read_manifest(root)["previous"] == "@k2"


def test_replacing_costs_the_same_requests_for_any_file_count(s3_bucket, s3_requests):
    """Replacement = begin + finish of another key around the files it writes: no request names one of
    its files (no copy, no per-file delete), and the count does not grow with the file count."""
    counts = {}
    for n in (5, 60):
        root = upath(s3_bucket) / f"run{n}" / "debias"
        _produce(root, "k1", n, "one")
        _produce(root, "k2", n, "two")  # from now on every replacement also deletes one stale prefix of n files
        sd = StageDir(root, "debias", "k3", {}, {})
        with s3_requests() as begin:
            sd.begin()
        _labels(sd, n, "three")
        with s3_requests() as finish:
            sd.finish({"n": n})
        calls = [*begin, *finish]
        assert not [t for _, t in calls if ".png" in t], calls
        assert finish.count("POST", where="?delete") == 1  # the stale prefix: one batched DeleteObjects
        assert _children(root) == {MANIFEST, "@k2", "@k3"} and (current(root) / "00003.png").read_bytes() == b"three-3"
        counts[n] = len(calls)
    assert counts[5] == counts[60] <= 40, counts


def test_flat_artifact_of_an_older_version_is_read_and_replaced(s3_bucket):
    root = upath(s3_bucket) / "run" / "debias"
    atomic_write_bytes(root / "a.png", b"old")
    atomic_write_json(root / MANIFEST, {"stage": "debias", "key": "k0", "status": "complete", "outputs": {}})
    assert current(root) == root  # no pointer: the files are where they always were
    assert not StageDir(root, "debias", "k0", {}, {}).is_complete()  # recomputed once into a prefix
    _produce(root, "k1", 1, "one")
    assert _children(root) == {MANIFEST, "@k1"}  # the flat files went with the first replacement
    assert current(root) == root / "@k1"


def test_foreign_folder_and_corrupt_pointer_are_named(s3_bucket):
    root = upath(s3_bucket) / "run" / "debias"
    atomic_write_bytes(root / "someone.png", b"x")
    with pytest.raises(ValueError, match=r"debias exists, is not empty and has no manifest.json"):
        StageDir(root, "debias", "k1", {}, {}).begin()
    atomic_write_json(root / MANIFEST, {"status": "complete", "current": "../elsewhere"})
    with pytest.raises(ValueError, match=r"manifest.json: corrupt pointer current='../elsewhere'"):
        current(root)


def test_local_layout_is_flat_and_unchanged(tmp_path: Path):
    root = tmp_path / "run" / "debias"
    _produce(root, "k1", 2, "one")
    sd = _produce(root, "k2", 2, "two")
    assert sd.path == root and current(root) == root
    assert sorted(p.name for p in root.iterdir()) == ["00000.png", "00001.png", MANIFEST, "stats.json"]
    m = read_manifest(root)
    assert m["key"] == "k2" and "current" not in m and "previous" not in m
    assert not (tmp_path / "run" / ".debias.prev").exists()
