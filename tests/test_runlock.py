"""One writer per run folder (``mars_ray.runlock``): refusal naming the holder, --wait, stale locks taken over.

The holder is a real second process (``_Holder``), killed with SIGKILL where the test needs a
crashed one; no Ray is started. Two real ``mars run`` processes racing for one folder are in
``tests/e2e/test_faults.py``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mars_ray import runlock
from mars_ray.cli import main
from mars_ray.runlock import HOLDER_FILE, RunFolderLocked, run_lock

ROOT = Path(__file__).resolve().parents[1]
HOLD = """
import sys
from pathlib import Path
from mars_ray.runlock import run_lock
with run_lock(Path(sys.argv[1]), command="mars run --out held-by-test"):
    print("held", flush=True)
    sys.stdin.readline()
"""


class _Holder:
    """A process that holds ``run`` until released (or killed)."""

    def __init__(self, run: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout.readline().strip() == "held"

    def release(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.proc.wait(timeout=30) == 0

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


def test_a_second_process_is_refused_with_one_line_naming_the_holder(tmp_path: Path, tiny_data: Path, capsys):
    run = tmp_path / "run"
    holder = _Holder(run)
    try:
        with pytest.raises(RunFolderLocked) as e:
            with run_lock(run, command="mars select"):
                pass
        msg = str(e.value)
        assert f"pid {holder.proc.pid} on {socket.gethostname()} since 20" in msg
        assert "(mars run --out held-by-test)" in msg and "--wait" in msg
        # the CLI: one line, exit 2, nothing written into the held folder (no config.yaml, no error file)
        rc = main(["features", "--data", str(tiny_data), "--pseudo-labels", str(tiny_data / "pseudo_labels"),
                   "--out", str(run)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith(f"mars: error: {run}: run folder in use by pid")
        assert sorted(p.name for p in run.iterdir()) == [".mars.lock", HOLDER_FILE]
    finally:
        holder.release()
    assert not (run / HOLDER_FILE).exists()  # a clean release removes the record
    with run_lock(run, command="mars select"):  # and the folder is free
        pass


def test_wait_queues_behind_the_holder(tmp_path: Path):
    run = tmp_path / "run"
    holder = _Holder(run)
    got = threading.Event()

    def second() -> None:
        with run_lock(run, command="mars run", wait=True, poll_s=0.05):
            got.set()

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.5)
    assert not got.is_set()
    holder.release()
    t.join(timeout=30)
    assert got.is_set()


def test_a_lock_left_by_kill_9_is_taken_over(tmp_path: Path, caplog):
    run = tmp_path / "run"
    holder = _Holder(run)
    pid = holder.proc.pid
    holder.kill()
    assert json.loads((run / HOLDER_FILE).read_text())["pid"] == pid  # the record outlives its process
    with caplog.at_level(logging.WARNING, logger="mars_ray.runlock"):
        with run_lock(run, command="mars run"):
            assert json.loads((run / HOLDER_FILE).read_text())["pid"] == os.getpid()
    assert f"taking over the run-folder lock of pid {pid}" in caplog.text


def _record(run: Path, **fields) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / HOLDER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "pid_start": None,
                                               "since": "2026-01-01T00:00:00", "command": "mars run", **fields}))


def test_records_where_flock_does_not_reach(tmp_path: Path, caplog):
    """NFS without a lock manager: the holder record still refuses a live holder of another host or
    this one, and is taken over once its heartbeat stopped or its pid is gone or reused."""
    run = tmp_path / "run"
    _record(run, host="other-host", pid=4242)
    with pytest.raises(RunFolderLocked, match="pid 4242 on other-host since 2026-01-01T00:00:00"):
        with run_lock(run, command="mars run"):
            pass
    old = time.time() - 2 * runlock.STALE_S  # its heartbeat stopped
    os.utime(run / HOLDER_FILE, (old, old))
    with caplog.at_level(logging.WARNING, logger="mars_ray.runlock"):
        with run_lock(run, command="mars run"):
            pass
    assert "taking over the run-folder lock of pid 4242 on other-host" in caplog.text

    _record(run, pid_start=runlock._pid_start(os.getppid()))  # this host, a live process (the test's parent)
    with pytest.raises(RunFolderLocked, match=f"pid {os.getppid()} on {socket.gethostname()}"):
        with run_lock(run, command="mars run"):
            pass
    _record(run, pid_start="1")  # the same pid number, another process by now: stale
    with run_lock(run, command="mars run"):
        pass


def test_reentry_in_one_process_is_free(tmp_path: Path):
    run = tmp_path / "run"
    with run_lock(run, command="mars demo"):
        with run_lock(run, command="mars run"):  # e.g. cli's demo command around run_demo
            assert (run / HOLDER_FILE).is_file()
        assert (run / HOLDER_FILE).is_file()
    assert not (run / HOLDER_FILE).exists()


def test_an_unwritable_out_is_one_line(tmp_path: Path, tiny_data: Path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc = main(["select", "--data", str(tiny_data), "--out", str(blocker / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"mars: error: {blocker / 'run'}")
