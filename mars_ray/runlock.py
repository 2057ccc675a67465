"""One writer per run folder: ``with run_lock(RUN, command=…):`` around everything a command writes.

``mars run``, every stage command, ``mars demo`` and ``mars tune`` hold it (``cli``, ``demo``,
``tune.sweep``); the stages themselves do not, so Tune trials — which write only below
``RUN/trials/`` and share ``RUN/cache`` under its own per-key lock (``stages.cache``) — run under
their sweep's lock without ever asking for it. A second process is refused at once with one line
naming the holder (``RunFolderLocked``, a ``ValueError``: ``mars: error: …``, exit 2), or waits
for it with ``wait=True`` (``--wait``).

Local folders (and NFS): an exclusive ``fcntl.flock`` on ``RUN/.mars.lock``. The kernel drops it
when its holder dies, however it dies (``kill -9`` included), so a killed run never blocks the
next. Beside it ``RUN/.mars.lock.json`` names the holder (host, pid, the pid's start time, since
when, command) for the refusal message; the holder touches it every ``HEARTBEAT_S`` seconds. The
record is the second line of defence where ``flock`` does not reach (an NFS mount without a lock
manager, ``nolock``, where each host only sees its own locks): a process that got the ``flock``
still refuses while the record names

* another live process on this host (pid alive with the same start time), or
* a process on another host whose heartbeat is younger than ``STALE_S`` (clocks of the hosts
  must agree to well within that),

and takes a record over — logging whose it was and why it is stale — when its pid is gone (or
was reused) on this host, or its heartbeat stopped on another. A filesystem that refuses
``flock`` altogether (``ENOLCK``) is handled by the record alone; two processes taking the same
stale record in the same instant are told apart by reading it back after writing it.

Object stores (``s3://…``): the cluster-wide lease lock of ``stages.locks`` (key ``run:<URI>``),
renewed while held and expiring ``LEASE_S`` seconds after its holder stopped renewing. It
excludes runs of the same Ray cluster; two separate clusters writing one URI are not seen.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from mars_ray import console, storage
from mars_ray.config import RayConfig
from mars_ray.storage import AnyPath

logger = logging.getLogger(__name__)

LOCK_FILE = ".mars.lock"
HOLDER_FILE = ".mars.lock.json"
HEARTBEAT_S = 10.0  # the holder touches its record this often
STALE_S = 60.0  # a record of another host untouched this long is stale
LEASE_S = 120.0  # object stores: lease of the cluster lock, renewed every LEASE_S / 3
POLL_S = 1.0  # --wait: how often to ask again

_held: dict[str, int] = {}  # run folders this process holds → nesting depth (re-entry is free)
_held_guard = threading.Lock()


class RunFolderLocked(ValueError):
    """Another process holds the run folder; the message names it (one line, exit code 2)."""

    log_traceback = False  # the folder is not ours: no error file goes into its logs/

    def __init__(self, run_dir: Any, holder: Optional[dict[str, Any]]) -> None:
        self.run_dir, self.holder = run_dir, holder
        super().__init__(f"{run_dir}: run folder in use by {describe(holder)}; wait for it to finish, "
                         "pass --wait to queue behind it, or choose another --out")


def describe(holder: Optional[dict[str, Any]]) -> str:
    """``pid 123 on host since 2026-…  (mars run …)`` from a holder record."""
    if not holder:
        return "another process (it has not written its name yet)"
    text = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"
    if holder.get("command"):
        text += f" ({holder['command']})"
    return text


def _pid_start(pid: int) -> Optional[str]:
    """The pid's start time in clock ticks since boot (Linux ``/proc``); ``None`` when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after "pid (comm)"


def _pid_alive(pid: int, start: Optional[str]) -> bool:
    """Is ``pid`` running on this host and still the process that wrote ``start``?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    now = _pid_start(pid)
    return start is None or now is None or now == start


def _me(command: str) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command[:300]}


def _is_me(holder: Optional[dict[str, Any]], me: dict[str, Any]) -> bool:
    return bool(holder) and all(holder.get(k) == me[k] for k in ("host", "pid", "pid_start", "since"))


def read_holder(run_dir: Path) -> Optional[dict[str, Any]]:
    """The holder record of a local run folder (``None`` when there is none or it is unreadable)."""
    try:
        data = json.loads((run_dir / HOLDER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def live_holder(run_dir: Path, holder: Optional[dict[str, Any]]) -> Optional[str]:
    """Why ``holder`` still holds the folder (``None``: absent or stale, with the reason logged by the caller)."""
    if not holder:
        return None
    if holder.get("host") == socket.gethostname():
        pid = holder.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid, holder.get("pid_start")):
            return "its process is running"
        return None
    try:
        age = time.time() - (run_dir / HOLDER_FILE).stat().st_mtime
    except OSError:
        return None
    return f"its heartbeat is {age:.0f} s old" if age < STALE_S else None


@contextmanager
def run_lock(run_dir: AnyPath, *, command: str, wait: bool = False, ray_cfg: Optional[RayConfig] = None,
             poll_s: float = POLL_S) -> Iterator[AnyPath]:
    """Hold ``run_dir`` (created if missing) for the block; ``RunFolderLocked`` when another process holds it.

    ``wait``: queue behind the holder instead (asking every ``poll_s`` s). ``command`` is what the
    refusal message of a second process shows. ``ray_cfg``: how to reach Ray for an object-store
    folder's lease lock (started if needed). Re-entering a folder this process holds is free.
    """
    key = storage.absolute(run_dir)
    with _held_guard:
        depth = _held.get(key, 0)
        if depth:
            _held[key] = depth + 1
    if depth:
        try:
            yield run_dir
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    inner = _lease_lock(run_dir, command, wait, ray_cfg) if storage.is_uri(run_dir) \
        else _file_lock(run_dir, command, wait, poll_s)
    with inner:
        with _held_guard:
            _held[key] = 1
        console.open_log()  # the folder is ours now: RUN/logs/mars.log may be written
        try:
            yield run_dir
        finally:
            with _held_guard:
                _held.pop(key, None)


@contextmanager
def _file_lock(run_dir: Path, command: str, wait: bool, poll_s: float) -> Iterator[None]:
    import fcntl

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # a file in the way, no permission, a read-only or full disk: the user's to fix
        raise ValueError(f"{run_dir}: cannot use this run folder: {e.strerror or e}") from e
    me = _me(command)
    flocked = False
    try:
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flocked = True
            except BlockingIOError:
                holder, why = read_holder(run_dir), "it holds the lock"
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                logger.warning("%s: the filesystem refuses flock (%s); relying on the holder record", run_dir, e)
                holder = read_holder(run_dir)
                why = live_holder(run_dir, holder)
            else:
                holder = read_holder(run_dir)
                why = live_holder(run_dir, holder)
                if why is not None:  # flock did not see it: a lock that does not reach its host
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    flocked = False
            if why is None and _take(run_dir, holder, me):
                break
            if not wait:
                raise RunFolderLocked(run_dir, holder or read_holder(run_dir))
            if not announced:
                logger.warning("%s: in use by %s; waiting (--wait)", run_dir, describe(holder))
                announced = True
            time.sleep(poll_s)
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(run_dir, me, stop), name="mars-run-lock", daemon=True)
        beat.start()
        try:
            yield
        finally:
            stop.set()
            beat.join(timeout=5)
            if _is_me(read_holder(run_dir), me):
                (run_dir / HOLDER_FILE).unlink(missing_ok=True)
    finally:
        if flocked:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _take(run_dir: Path, old: Optional[dict[str, Any]], me: dict[str, Any]) -> bool:
    """Write our record over ``old`` (absent or stale); ``False`` when another taker won the race."""
    from mars_ray.artifacts import atomic_write_json

    if old and not _is_me(old, me):
        logger.warning("%s: taking over the run-folder lock of %s (no longer running)", run_dir, describe(old))
    atomic_write_json(run_dir / HOLDER_FILE, me)
    if old and old.get("host") != me["host"]:  # without a shared flock: read back after a moment
        time.sleep(0.2)
        return _is_me(read_holder(run_dir), me)
    return True


def _heartbeat(run_dir: Path, me: dict[str, Any], stop: threading.Event) -> None:
    record = run_dir / HOLDER_FILE
    while not stop.wait(HEARTBEAT_S):
        if not _is_me(read_holder(run_dir), me):
            logger.warning("%s: the run-folder lock record is no longer ours (now: %s)", run_dir,
                           describe(read_holder(run_dir)))
            return
        try:
            os.utime(record)
        except OSError as e:
            logger.warning("%s: cannot refresh the run-folder lock record (%s)", run_dir, e)


@contextmanager
def _lease_lock(run_dir: AnyPath, command: str, wait: bool, ray_cfg: Optional[RayConfig]) -> Iterator[None]:
    from mars_ray.stages.locks import LeaseHeld, cluster_lock
    from mars_ray.stages.runtime import ensure_ray

    ensure_ray(ray_cfg or RayConfig())
    try:
        with cluster_lock(f"run:{storage.absolute(run_dir)}", LEASE_S, wait=wait, info=_me(command)):
            yield
    except LeaseHeld as e:
        raise RunFolderLocked(run_dir, e.info) from None


__all__ = ["HOLDER_FILE", "LOCK_FILE", "RunFolderLocked", "describe", "read_holder", "run_lock"]
