"""Fault injection (issue 12): kill -9 at several points of every stage, killed Ray actors and Train
workers, a full disk, two runs into one folder. Nothing lost, nothing mixed, no finished shard redone.

Kills: the ``mars`` command runs in its own session; ``MARS_KILL_AT`` (the test seam
``mars_ray.faults``) makes it SIGKILL its process group at a named point, or the test kills the group
when it sees a file appear (mid-stage: labels, predictions, a Ray Train checkpoint). After every
kill: no file under a final name is partial, the manifest is not ``complete``, and the shards
already written are remembered (inode + mtime); the next run must leave them alone. The last run
must give the clean reference run's artifacts (``full_run``; training stages: the same final step,
metrics within tolerance). Counts of what was injected and checked go to ``$MARS_FAULT_COUNTS``
(a JSON-lines file) when it is set.

Default suite: a kill before Ray starts with an older artifact set aside, and a full disk while the
run folder's config is written. Everything else is ``slow``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
from PIL import Image

from mars_ray import config as C
from mars_ray import storage
from mars_ray.artifacts import read_manifest
from mars_ray.cli import main
from mars_ray.data.label_io import read_label

from tests.conftest import copy_run

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.timeout(1800)]


# -- helpers ------------------------------------------------------------------------------------


def _count(**fields) -> None:
    """One line of the fault report (``$MARS_FAULT_COUNTS``)."""
    path = os.environ.get("MARS_FAULT_COUNTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(fields) + "\n")


def mars(args: list[str], *, kill_at: str = "", kill_when: Optional[Callable[[], bool]] = None,
         timeout: float = 900) -> tuple[int, str]:
    """``python -m mars_ray ARGS`` in its own session → (exit code, output); -9 when killed.

    ``kill_at``: the ``MARS_KILL_AT`` point; ``kill_when``: SIGKILL the whole group once it is true.
    Whatever is left of the group afterwards is killed too (Ray's agents live in it).
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("MARS_KILL_AT", None)
    if kill_at:
        env["MARS_KILL_AT"] = kill_at
    proc = subprocess.Popen([sys.executable, "-m", "mars_ray", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    t0 = time.monotonic()
    try:
        while proc.poll() is None:
            if kill_when is not None and kill_when():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                break
            if time.monotonic() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                raise AssertionError(f"mars {' '.join(args)} did not end in {timeout:.0f} s:\n{''.join(out)[-3000:]}")
            time.sleep(0.2)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        reader.join(timeout=10)
    return proc.returncode, "".join(out)


def _files(folder: Path, pattern: str = "*.png") -> dict[str, tuple[int, int]]:
    """Final-name shard files → (inode, mtime_ns): what a rerun must not rewrite."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in folder.rglob(pattern) if p.is_file() and not p.name.startswith(".")}


def _whole(folder: Path) -> int:
    """Every file under a final name decodes; returns how many were checked (temporaries are hidden dotfiles)."""
    import pyarrow.parquet as pq
    import torch

    n = 0
    for p in folder.rglob("*"):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(folder).parts) \
                or "ray" in p.relative_to(folder).parts:
            continue
        if p.suffix == ".png":
            with Image.open(p) as im:
                im.load()  # every byte decoded: a half-written PNG fails here
        elif p.suffix == ".npy":
            np.load(p)
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".parquet":
            pq.read_table(p)
        elif p.suffix == ".pt":
            torch.load(p, map_location="cpu", weights_only=False)
        n += 1
    return n


def _not_finished(stage_dir: Path) -> None:
    m = read_manifest(stage_dir)
    assert m is None or m.get("status") != "complete", f"{stage_dir}: a killed run left it 'complete'"


def _labels_equal(a: Path, b: Path, pattern: str = "*.png") -> int:
    names = sorted(p.name for p in a.glob(pattern))
    assert names and names == sorted(p.name for p in b.glob(pattern))
    for n in names:
        np.testing.assert_array_equal(read_label(a / n), read_label(b / n), err_msg=str(a / n))
    return len(names)


# -- default suite: the cheapest faults ----------------------------------------------------------


def _cli_flags(tiny_data: Path) -> list[str]:
    """The flags that rebuild ``debiased_run``'s config on the command line."""
    return ["--data", str(tiny_data), "--pseudo-labels", str(tiny_data / "pseudo_labels"), "--set", "debias.crf=false"]


@pytest.mark.ray
def test_kill_9_after_an_older_artifact_was_set_aside_loses_nothing(debiased_run: Path, tiny_data: Path,
                                                                     tmp_path_factory, capsys):
    """`mars select` with a new α, killed right after it set the finished artifact aside (before Ray):
    the old α is still there to come back — not recomputed — and the new α then completes."""
    run = copy_run(debiased_run, tmp_path_factory)
    before = _files(run / "select", "*.npy")
    old = {n: (run / "select" / n).read_bytes() for n in before}
    rc, out = mars(["select", *_cli_flags(tiny_data), "--set", "select.alpha=0.2", "--out", str(run)],
                   kill_at="select.begin", timeout=300)
    assert rc == -signal.SIGKILL, out[-2000:]
    _not_finished(run / "select")
    assert (run / ".select.prev" / "centroids.npy").is_file()  # set aside, not deleted
    # back to the old α: the set-aside artifact returns as it was (same files, not rewritten); the
    # killed process's lock record is stale and taken over
    assert main(["select", *_cli_flags(tiny_data), "--out", str(run)]) == 0
    assert _files(run / "select", "*.npy") == before
    assert {n: (run / "select" / n).read_bytes() for n in before} == old
    assert main(["select", *_cli_flags(tiny_data), "--set", "select.alpha=0.2", "--out", str(run)]) == 0
    assert read_manifest(run / "select")["config"]["select"]["alpha"] == 0.2
    capsys.readouterr()
    _count(fault="kill -9", stage="select", point="select.begin", rerun_identical=True,
           shards_not_recomputed=len(before))


@pytest.mark.ray
def test_kill_9_of_a_rerun_on_s3_keeps_the_pointer_then_resumes_its_prefix(debiased_run: Path, tiny_data: Path,
                                                                           s3_bucket: str, capsys):
    """Object store: `mars debias` with a new threshold, killed after every label of its prefix was
    written (``debias.finish``). The pointer is untouched, so the finished artifact (here a flat one,
    as older versions wrote it) stays current; the same command then resumes the prefix, rewriting
    no label, and only then becomes current."""
    from mars_ray.artifacts import current
    from tests.conftest import upload_tree

    run = storage.upath(f"{s3_bucket}/run")
    for stage in ("features", "select", "debias"):
        upload_tree(debiased_run / stage, str(run / stage))
    pointer = (run / "debias" / "manifest.json").read_bytes()
    flat = storage.list_files(run / "debias")
    cmd = ["debias", *_cli_flags(tiny_data), "--set", "debias.threshold=0.6", "--out", str(run)]
    rc, out = mars(cmd, kill_at="debias.finish", timeout=300)
    assert rc == -signal.SIGKILL, out[-2000:]
    assert (run / "debias" / "manifest.json").read_bytes() == pointer and current(run / "debias") == run / "debias"
    (prefix,) = [p for p in (run / "debias").iterdir() if p.name.startswith("@")]
    _not_finished(prefix)
    written = {n: st for n, st in storage.list_files(prefix).items() if n.endswith(".png")}
    assert len(written) == len([n for n in flat if n.endswith(".png")])
    assert main(cmd) == 0  # same key → same prefix → resumed
    assert current(run / "debias") == prefix and read_manifest(prefix)["status"] == "complete"
    assert {n: st for n, st in storage.list_files(prefix).items() if n.endswith(".png")} == written  # none rewritten
    assert set(storage.list_files(run / "debias")) == {"manifest.json"}  # the flat files went with the replacement
    capsys.readouterr()
    _count(fault="kill -9", stage="debias", point="debias.finish (s3)", rerun_identical=True,
           shards_not_recomputed=len(written))


class _DiskFull:
    """``storage.atomic_open``'s writes fail with ENOSPC for one file name (the OS layer under it)."""

    def __init__(self, name: str) -> None:
        self.name, self.hits = name, 0

    def __call__(self, file, mode="r", *args, **kwargs):  # noqa: ANN001 - builtins.open's signature
        f = open(file, mode, *args, **kwargs)
        if "w" in mode and Path(file).name.startswith(f".{self.name}.tmp-"):
            self.hits += 1
            real_write = f.write

            def write(data):  # noqa: ANN001
                real_write(bytes(data)[:3])  # a few bytes land, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")

            f.write = write
        return f


def test_disk_full_while_writing_the_run_config(tmp_path: Path, tiny_data: Path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("# the previous run's config\n")
    full = _DiskFull("config.yaml")
    monkeypatch.setattr(storage, "open", full, raising=False)
    rc = main(["features", *_cli_flags(tiny_data), "--out", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert full.hits == 1 and rc == 2 and len(err) == 1
    assert err[0].startswith(f"mars: error: {run / 'config.yaml'}: No space left on device (full traceback: ")
    assert (run / "config.yaml").read_text() == "# the previous run's config\n"
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]  # no half-written file left
    _count(fault="ENOSPC", where="config.yaml", previous_intact=True)


# -- slow: the matrix ----------------------------------------------------------------------------


def _checkpoint_of(folder: Path, name: str) -> Callable[[], bool]:
    """True once Ray Train reported a checkpoint of run ``name`` under ``folder/ray``."""
    return lambda: any((folder / "ray" / name).glob("checkpoint_*/state.pt"))


def _at_least(folder: Path, n: int, pattern: str = "*.png") -> Callable[[], bool]:
    return lambda: folder.is_dir() and sum(1 for _ in folder.glob(pattern)) >= n


#: stage → (folders it writes besides RUN/<stage>, kill points in order; a callable kills on a condition)
MATRIX: dict[str, tuple[tuple[str, ...], list]] = {
    "features": ((), ["features.begin", "features.table", "features.finish"]),
    "select": ((), ["select.begin", "select.chosen", "select.finish"]),
    "debias": ((), ["debias.begin", ("mid: 4 labels", lambda r: _at_least(r / "debias", 4)), "debias.finish"]),
    "evaluate": ((), ["evaluate.begin", ("mid: 2 predictions", lambda r: _at_least(r / "evaluate" / "pred", 2)),
                      "evaluate.finish"]),
    "wsss": ((), ["wsss.begin", ("mid-training: epoch-1 checkpoint", lambda r: _checkpoint_of(r / "wsss", "wsss")),
                  "wsss.classifier", ("mid-CAMs: 4 labels", lambda r: _at_least(r / "wsss", 4)), "wsss.finish"]),
    "uss": ((), ["uss.begin", ("mid-training: a checkpoint", lambda r: _checkpoint_of(r / "uss", "uss")),
                 "uss.checkpoint", "uss.finish"]),
    "train": (("complement", "predict"), ["train.begin", ("mid-training: epoch-1 checkpoint",
                                                          lambda r: _checkpoint_of(r / "train", "mars")),
                                          "train.model", "train.finish"]),
}
SHARDS = {"debias": ("debias", "*.png"), "wsss": ("wsss", "*.png"), "evaluate": ("evaluate/pred", "*.png")}


def _compare(stage: str, run: Path, ref: Path) -> dict:
    """The rerun's artifact against the clean reference's; returns what was compared."""
    import pyarrow.parquet as pq

    if stage == "features":
        def table(r: Path):
            t = pq.read_table(r / "features" / "centroids.parquet").to_pandas()
            return t.sort_values(["image_id", "class_id", "k"]).reset_index(drop=True)
        a, b = table(run), table(ref)
        assert a.drop(columns="vector").equals(b.drop(columns="vector"))
        np.testing.assert_array_equal(np.stack(a["vector"]), np.stack(b["vector"]))
        return {"rows": len(a)}
    if stage == "select":
        for n in ("centroids.npy", "present.npy"):
            np.testing.assert_array_equal(np.load(run / "select" / n), np.load(ref / "select" / n))
        assert json.loads((run / "select" / "report.json").read_text()) == json.loads((ref / "select" / "report.json").read_text())
        return {"files": 3}
    if stage == "debias":
        return {"labels": _labels_equal(run / "debias", ref / "debias")}
    if stage == "evaluate":
        a, b = (json.loads((r / "evaluate" / "metrics.json").read_text()) for r in (run, ref))
        assert a["miou"] == b["miou"] and a["per_class"] == b["per_class"]
        return {"predictions": _labels_equal(run / "evaluate" / "pred", ref / "evaluate" / "pred")}
    if stage in ("train", "uss", "wsss"):
        return _compare_training(stage, run, ref)
    raise AssertionError(stage)


def _compare_training(stage: str, run: Path, ref: Path) -> dict:
    """Training stages: the same final step; metrics within tolerance (a resumed run may draw other crops)."""
    a, b = (read_manifest(r / stage) for r in (run, ref))
    if stage == "train":
        import torch
        ea, eb = (torch.load(r / "train" / "model.pt", map_location="cpu", weights_only=False)["extra"]
                  for r in (run, ref))
        assert (ea["epoch"], ea["step"]) == (eb["epoch"], eb["step"])
        va, vb = a["outputs"]["val_miou"], b["outputs"]["val_miou"]
        assert abs(va - vb) <= 0.05, (va, vb)
        return {"step": ea["step"], "val_miou": va, "val_miou_reference": vb}
    if stage == "uss":
        assert a["outputs"]["steps"] == b["outputs"]["steps"]
        la, lb = a["outputs"]["final_loss"], b["outputs"]["final_loss"]
        assert abs(la - lb) <= 0.25 * abs(lb) + 0.05, (la, lb)
        return {"steps": a["outputs"]["steps"], "final_loss": la, "final_loss_reference": lb}
    ha, hb = (json.loads((r / "wsss" / "history.json").read_text()) for r in (run, ref))
    assert ha[-1]["step"] == hb[-1]["step"]
    same = np.mean([np.mean(read_label(p) == read_label(ref / "wsss" / p.name)) for p in (run / "wsss").glob("*.png")])
    assert same >= 0.8, same  # CAM labels of a resumed classifier: mostly the same pixels
    return {"step": ha[-1]["step"], "label_pixels_equal": float(same)}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("stage", list(MATRIX))
def test_kill_9_matrix(stage: str, full_run: dict, tmp_path_factory):
    ref = full_run["run"]
    run = copy_run(ref, tmp_path_factory)
    extra, points = MATRIX[stage]
    for name in (stage, *extra):
        storage.rmtree(run / name)
    args = [stage, "--config", str(full_run["config"]), "--out", str(run)]
    kept: dict[str, tuple[int, int]] = {}
    stats = {"kills": 0, "shards_kept": 0, "files_checked": 0}
    late = False  # the last polled kill landed after the stage completed (it may have released the lock)
    for point in points:
        label, when = (point, None) if isinstance(point, str) else (point[0], point[1](run))
        rc, out = mars(args, kill_at=label if when is None else "", kill_when=when)
        if rc == 0:  # the stage finished before the condition was seen: nothing was killed
            _count(fault="kill -9", stage=stage, point=label, injected=False)
            break
        assert rc == -signal.SIGKILL, f"{label}: exit {rc}\n{out[-3000:]}"
        if when is not None and (read_manifest(run / stage) or {}).get("status") == "complete":
            # a polled kill can land after the stage finished: the poll saw its shards, the manifest was
            # written before the signal arrived (a small split's CAMs take well under the 0.2 s poll).
            # Nothing was cut short; the rerun and the comparison with the reference below check the
            # artifact it left. Seam kills (no ``when``) stay strict: they fire before the manifest.
            _count(fault="kill -9", stage=stage, point=label, injected=False, landed="after the stage completed")
            late = True
            break
        stats["kills"] += 1
        _not_finished(run / stage)
        stats["files_checked"] += _whole(run / stage)
        if stage in SHARDS:
            folder, pattern = SHARDS[stage]
            now = _files(run / folder, pattern)
            assert all(now.get(k) == v for k, v in kept.items()), f"{label}: shards of an earlier run were rewritten"
            kept = now
        _count(fault="kill -9", stage=stage, point=label, injected=True)
    rc, out = mars(args)
    assert rc == 0, out[-3000:]
    assert "taking over the run-folder lock" in out or stats["kills"] == 0 or late
    if stage in SHARDS:
        folder, pattern = SHARDS[stage]
        now = _files(run / folder, pattern)
        assert all(now.get(k) == v for k, v in kept.items()), "the final run rewrote finished shards"
        stats["shards_kept"] = len(kept)
    compared = _compare(stage, run, ref)
    _count(fault="kill -9 rerun", stage=stage, rerun_identical=True, **stats, **compared)


@pytest.mark.ray
@pytest.mark.slow
def test_kill_9_of_a_tune_sweep_mid_trial(tiny_data: Path, tmp_path: Path, ray_local):
    """A sweep killed while a trial debiases; the rerun completes, reusing every finished features cache entry."""
    space = ROOT / "tune_spaces" / "alpha_kbg_smoke.yaml"
    args = ["tune", "--space", str(space), "--quiet", "--data", str(tiny_data), "--pseudo-labels",
            str(tiny_data / "pseudo_labels"), "--out", str(tmp_path / "run"), "--set", "debias.crf=false"]
    trials = tmp_path / "run" / "trials"
    rc, out = mars(args, kill_when=lambda: any(trials.glob("*/debias/*.png")))
    assert rc == -signal.SIGKILL, out[-3000:]
    cache = tmp_path / "run" / "cache"
    done = {p.name: p.stat().st_mtime_ns for p in cache.glob("features-*")
            if (read_manifest(p) or {}).get("status") == "complete"}
    assert done, "no features cache entry finished before the kill"
    rc, out = mars(args)
    assert rc == 0, out[-3000:]
    summary = json.loads((tmp_path / "run" / "tune" / "summary.json").read_text())
    assert summary["failed"] == 0 and summary["trials"] >= 2
    assert {p: (cache / p).stat().st_mtime_ns for p in done} == done  # reused, not recomputed
    # every trial's objective equals a trial of the same point computed afresh, in-process
    from mars_ray.tune.trial import run_trial
    import csv
    with open(tmp_path / "run" / "tune" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    row = rows[0]
    cfg = C.build(tmp_path / "run" / "config.yaml", {k: float(row[k]) if k == "select.alpha" else int(row[k])
                                                    for k in ("select.alpha", "features.k_bg") if k in row})
    fresh = run_trial(C.merge(cfg, {"features.cache_dir": ""}), tmp_path / "fresh")
    assert abs(fresh["debiased_miou"] - float(row["debiased_miou"])) < 1e-9
    _count(fault="kill -9", stage="tune trial", injected=True, rerun_identical=True, cache_entries_kept=len(done),
           trials=summary["trials"])


def _descendants(pid: int) -> list[int]:
    """Processes below ``pid`` (this test's own Ray: never another user's)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill_worker(title: str) -> Optional[int]:
    """SIGKILL one process of this test's Ray whose title holds ``title``; its pid, or None."""
    for pid in _descendants(os.getpid()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title in cmd:
            os.kill(pid, signal.SIGKILL)
            return pid
    return None


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=target)
    t.start()
    return t, box


@pytest.mark.ray
@pytest.mark.slow
def test_a_ray_data_actor_killed_mid_stage(full_run: dict, tmp_path_factory):
    """One DebiasImages actor SIGKILLed after some labels: Ray Data restarts it and retries its batch."""
    from mars_ray import pipeline

    ref = full_run["run"]
    run = copy_run(ref, tmp_path_factory)
    storage.rmtree(run / "debias")
    cfg = C.build(full_run["config"])
    t, box = _in_thread(lambda: pipeline.run_stage(cfg, run, "debias"))
    killed = None
    deadline = time.monotonic() + 600
    while killed is None and t.is_alive() and time.monotonic() < deadline:
        if _at_least(run / "debias", 2)():
            killed = _kill_worker("DebiasImages")
        time.sleep(0.1)
    t.join(timeout=900)
    assert "error" not in box, box.get("error")
    assert killed is not None, "the stage ended before an actor could be killed"
    n = _labels_equal(run / "debias", ref / "debias")
    _count(fault="ray.data actor SIGKILL", stage="debias", injected=True, completed=True, rerun_identical=True, labels=n)


@pytest.mark.ray
@pytest.mark.slow
def test_a_ray_train_worker_killed_mid_epoch(full_run: dict, tmp_path_factory):
    """The Train worker SIGKILLed after the epoch-1 checkpoint: FailureConfig restarts it from there,
    the step counter continues and the run ends where the clean one did."""
    from mars_ray import pipeline

    ref = full_run["run"]
    run = copy_run(ref, tmp_path_factory)
    for name in ("train", "complement", "predict"):
        storage.rmtree(run / name)
    cfg = C.merge(C.build(full_run["config"]), {"train.max_failures": 1, "train.epochs": 3})
    t, box = _in_thread(lambda: pipeline.run_stage(cfg, run, "train"))
    killed = None
    deadline = time.monotonic() + 900
    while killed is None and t.is_alive() and time.monotonic() < deadline:
        if _checkpoint_of(run / "train", "mars")():
            killed = _kill_worker("RayTrainWorker")
        time.sleep(0.1)
    t.join(timeout=1200)
    assert "error" not in box, box.get("error")
    assert killed is not None, "training ended before its worker could be killed"
    import csv
    with open(run / "train" / "history.csv") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and steps == sorted(steps)
    assert steps[-1] == 3 * steps[0]  # the counter continued across the restart
    _count(fault="ray.train worker SIGKILL", stage="train", injected=True, resumed=True, final_step=steps[-1])


@pytest.mark.ray
@pytest.mark.slow
def test_disk_full_in_a_stage_keeps_the_previous_artifact(full_run: dict, tiny_data: Path, tmp_path_factory,
                                                          monkeypatch, capsys, ray_local):
    run = copy_run(full_run["run"], tmp_path_factory)
    before = {p.name: p.read_bytes() for p in (run / "select").iterdir() if p.is_file()}
    full = _DiskFull("centroids.npy")
    monkeypatch.setattr(storage, "open", full, raising=False)
    rc = main(["select", "--config", str(full_run["config"]), "--set", "select.alpha=0.7", "--out", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    lines = [ln for ln in err if ln.startswith("mars: ")]
    assert full.hits == 1 and rc == 2 and len(lines) == 1, err[-20:]
    assert lines[0].startswith(f"mars: error: {run / 'select' / 'centroids.npy'}: No space left on device")
    assert {p.name: p.read_bytes() for p in (run / "select").iterdir() if p.is_file()} == before
    assert not (run / ".select.prev").exists()
    _count(fault="ENOSPC", where="select/centroids.npy", previous_intact=True)


@pytest.mark.ray
@pytest.mark.slow
def test_two_runs_into_one_folder_never_mix(debiased_run: Path, tiny_data: Path, tmp_path: Path):
    """Issue 12's first failure: two `mars run --until debias` 4 s apart into one folder. Now the second
    is refused with one line; with --wait it queues, then finds everything done; the outputs are
    exactly a clean run's."""
    run = tmp_path / "run"
    args = ["run", *_cli_flags(tiny_data), "--until", "debias", "--out", str(run)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen([sys.executable, "-m", "mars_ray", *args], env=env, start_new_session=True,
                             stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / ".mars.lock.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(4)
        rc, out = mars(args)  # refused at once
        assert rc == 2 and f"mars: error: {run}: run folder in use by pid {first.pid}" in out, out[-2000:]
        rc, out = mars([*args, "--wait"])  # queues behind the first, then finds its work done
        assert rc == 0, out[-3000:]
        assert first.wait(timeout=900) == 0
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
    assert re.search(r"features\s+up to date", out) and re.search(r"debias\s+up to date", out), out[-3000:]
    n = _labels_equal(run / "debias", debiased_run / "debias")
    for name in ("centroids.npy", "present.npy"):
        np.testing.assert_array_equal(np.load(run / "select" / name), np.load(debiased_run / "select" / name))
    _count(fault="concurrent mars run", refused=1, waited=1, labels_identical=n, mixed=0)
