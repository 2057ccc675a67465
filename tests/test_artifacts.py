import json
from pathlib import Path

import numpy as np
import pytest

from mars_ray.artifacts import StageDir, atomic_save_npy, atomic_write_json, fingerprint_path, require_complete


def _sd(path: Path, key: str) -> StageDir:
    return StageDir(path, "demo", key, {"a": 1}, {"in": "x"})


def test_manifest_lifecycle(tmp_path: Path):
    sd = _sd(tmp_path / "stage", "k1")
    assert not sd.is_complete()
    assert sd.begin() is False
    assert json.loads(sd.manifest_path.read_text())["status"] == "running"
    (sd.path / "part.png").write_bytes(b"x")
    # same key while running → resume keeps the partial outputs
    assert _sd(sd.path, "k1").begin() is True
    assert (sd.path / "part.png").exists()
    sd.finish({"n": 1})
    assert sd.is_complete()
    assert require_complete(sd.path, "demo")["outputs"] == {"n": 1}
    # another key → the folder starts afresh
    sd2 = _sd(sd.path, "k2")
    assert not sd2.is_complete()
    assert sd2.begin() is False
    assert not (sd.path / "part.png").exists()


def test_refuses_to_clear_a_foreign_folder(tmp_path: Path):
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "precious.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        _sd(tmp_path / "stage", "k").begin()
    assert (tmp_path / "stage" / "precious.txt").read_text() == "mine"


def test_require_complete_names_the_stage(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="mars features"):
        require_complete(tmp_path / "features", "features")


def test_atomic_writes_leave_no_temp_files(tmp_path: Path):
    atomic_write_json(tmp_path / "a.json", {"x": np.float32(1.5)})
    atomic_save_npy(tmp_path / "a.npy", np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.npy"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1.5}


def test_fingerprint_changes_with_content(tmp_path: Path):
    (tmp_path / "f.txt").write_text("a")
    a = fingerprint_path(tmp_path)
    (tmp_path / "f.txt").write_text("ab")
    assert fingerprint_path(tmp_path) != a
    assert fingerprint_path(None) == "none"


def test_failure_restores_the_previous_artifact(tmp_path: Path):
    sd = _sd(tmp_path / "stage", "k1")
    sd.begin()
    (sd.path / "result.txt").write_text("old")
    sd.finish({})
    sd2 = _sd(sd.path, "k2")
    with pytest.raises(RuntimeError):
        with sd2.guard():
            (sd.path / "result.txt").write_text("half")
            raise RuntimeError("bad input found mid-stage")
    assert (sd.path / "result.txt").read_text() == "old"
    assert sd.is_complete() and not sd2.previous_path.exists()
    with sd2.guard():
        sd2.finish({})
    assert sd2.is_complete() and not sd2.previous_path.exists()
