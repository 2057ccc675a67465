"""Any failure → one line for the person at the terminal, and its full traceback in ``RUN/logs/``.

A *user error* is what the project raises for bad input — ``ValueError`` / ``FileNotFoundError``
naming the file and the cause — or what the machine says about the run folder (disk full, no
permission, read-only, over quota: an ``OSError`` with one of ``ENV_ERRNOS``). Whatever wraps it on
the way back from a Ray worker is unwrapped:

* Ray Core: ``RayTaskError`` / ``RayActorError`` (``.cause``; ``RayTaskError(ValueError)`` is a
  dynamic subclass of both, so it is never taken for the user error itself);
* Ray Data: ``UserCodeException`` — its ``__cause__`` (the ``ValueError``) does not survive
  pickling, so the worker's formatted traceback, kept by the ``RayTaskError`` around it, is read
  instead: the last non-Ray exception line in it is the one the UDF raised;
* Ray Train V2: ``TrainingFailedError`` → ``WorkerGroupError.worker_failures`` (per rank) →
  ``UserExceptionWithTraceback._base_exc``; ``ControllerError.controller_failure``;
* Ray Tune: a trial's ``RayTaskError``, or ``TuneError`` holding the trial's traceback as text;
* plain Python chaining (``raise … from e``, ``__context__``).

:func:`report_error` writes the whole chain to ``RUN/logs/error-<time>-<pid>.txt`` (``$TMPDIR/mars-logs``
when the run folder does not exist or cannot be written) and returns the exit code and the line:
``mars: error: FILE: cause (full traceback: …)`` with code 2 for a user error; for anything else
(a bug, a Ray failure) code 1, the line ``mars: internal error: …`` and the traceback to show.
Nothing here prints: ``cli.main`` does.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import sys
import tempfile
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Optional

#: ``OSError`` numbers that are about the machine or the run folder, not a bug: shown as one line
ENV_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS})
LOGS = "logs"

# "ValueError: msg", "builtins.ValueError: msg", "ray.exceptions.UserCodeException: msg" at column 0
_HEADER = re.compile(r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception|Exit)): ?(?P<msg>.*)$")
_ERRNO = re.compile(r"^\[Errno (\d+)\]")
_TEXT_TYPES: dict[str, type] = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError,
                                "PermissionError": PermissionError, "OSError": OSError}


def _is_ray(e: BaseException) -> bool:
    return type(e).__module__.split(".")[0] == "ray"


def is_user_error(e: BaseException) -> bool:
    """A bad input (``ValueError``/``FileNotFoundError``) or an environment ``OSError`` (``ENV_ERRNOS``)."""
    if _is_ray(e):
        return False
    if isinstance(e, (ValueError, FileNotFoundError)):
        return True
    return isinstance(e, OSError) and e.errno in ENV_ERRNOS


def _links(e: BaseException) -> Iterator[BaseException]:
    """The exceptions ``e`` wraps, nearest first (see the module docstring for which attribute is whose)."""
    cause = getattr(e, "cause", None)  # RayTaskError, RayActorError
    if isinstance(cause, BaseException):
        yield cause
    base = getattr(e, "_base_exc", None)  # ray.train UserExceptionWithTraceback
    if isinstance(base, BaseException):
        yield base
    failures = getattr(e, "worker_failures", None)  # ray.train WorkerGroupError: {rank: error}
    if isinstance(failures, dict):
        for _, f in sorted(failures.items(), key=lambda kv: str(kv[0])):
            if isinstance(f, BaseException):
                yield f
    ctrl = getattr(e, "controller_failure", None)  # ray.train ControllerError
    if isinstance(ctrl, BaseException):
        yield ctrl
    for linked in (e.__cause__, e.__context__):
        if linked is not None:
            yield linked


def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and everything it wraps, breadth first, each once."""
    seen: set[int] = set()
    out: list[BaseException] = []
    queue = deque([e])
    while queue:
        x = queue.popleft()
        if id(x) in seen:
            continue
        seen.add(id(x))
        out.append(x)
        queue.extend(_links(x))
    return out


def _texts(e: BaseException) -> Iterator[str]:
    """Formatted tracebacks a Ray/Tune error carries as text (a worker's, a trial's)."""
    for attr in ("traceback_str", "_traceback_str"):
        t = getattr(e, attr, None)
        if isinstance(t, str) and t:
            yield t
    if _is_ray(e):
        try:
            yield str(e)
        except Exception:  # noqa: BLE001 - an unprintable error has no text to read
            return


def error_from_text(text: str) -> Optional[BaseException]:
    """The user error a formatted traceback ends in, rebuilt; ``None`` when it ends in something else.

    The last exception line that is not Ray's own is the one user code raised (Ray's wrappers
    come after it); it counts when its type is ``ValueError``, ``FileNotFoundError``, or an
    ``OSError``/``PermissionError`` with an ``[Errno n]`` of ``ENV_ERRNOS``. A message continues
    on the following lines up to a blank line.
    """
    lines = text.splitlines()
    last: Optional[tuple[str, str]] = None
    for i, line in enumerate(lines):
        m = _HEADER.match(line)
        if not m:
            continue
        typ = m["type"]
        if typ.startswith("ray."):
            continue
        msg = [m["msg"]]
        for nxt in lines[i + 1:]:
            if not nxt.strip() or _HEADER.match(nxt) or nxt.startswith(("Traceback ", "  File ", "The above exception",
                                                                         "During handling")):
                break
            msg.append(nxt.strip())
        last = (typ.rsplit(".", 1)[-1] if typ.startswith("builtins.") else typ, " ".join(msg).strip())
    if last is None or last[0] not in _TEXT_TYPES:
        return None
    typ, msg = last
    if typ in ("OSError", "PermissionError"):
        m = _ERRNO.match(msg)
        if not m or int(m.group(1)) not in ENV_ERRNOS:
            return None
    return _TEXT_TYPES[typ](msg)


def user_error(e: BaseException) -> Optional[BaseException]:
    """The user error behind ``e`` (``e`` itself, or what Ray/Tune/Train wrapped), else ``None``."""
    chain = _chain(e)
    for x in chain:
        if is_user_error(x):
            return x
    for x in chain:  # a cause lost in pickling: the worker's traceback text still names it
        for text in _texts(x):
            found = error_from_text(text)
            if found is not None:
                return found
    return None


def one_line(e: BaseException) -> str:
    """``FILE: cause`` on one line (an ``OSError`` with a file name gets it in front)."""
    if isinstance(e, OSError) and e.filename and e.strerror:  # as the OS raised it: "[Errno 28] … : 'path'"
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def write_traceback(e: BaseException, run_dir: "str | os.PathLike[str] | None", *,
                    argv: Optional[list[str]] = None) -> Optional[str]:
    """The whole chain (and any worker's traceback text) into ``RUN/logs/error-<time>-<pid>.txt``.

    ``RUN`` must exist already (a config error before the run folder was made does not create
    it); otherwise, or when it cannot be written (that may be the error), the file goes to
    ``$TMPDIR/mars-logs/``. Returns where it went, or ``None`` when nowhere could be written.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"error-{stamp}-{os.getpid()}.txt"
    parts = [f"mars {' '.join(argv if argv is not None else sys.argv[1:])}",
             f"host {socket.gethostname()}, pid {os.getpid()}, {time.strftime('%Y-%m-%dT%H:%M:%S%z')}", "",
             "".join(traceback.format_exception(e))]
    for x in _chain(e)[1:]:
        for text in _texts(x):
            parts += ["", f"--- carried by {type(x).__module__}.{type(x).__qualname__} ---", text]
    body = "\n".join(parts)
    for folder in _log_folders(run_dir):
        try:
            path = _write_into(folder, name, body)
        except OSError:
            continue
        return str(path)
    return None


def _log_folders(run_dir: "str | os.PathLike[str] | None") -> list[Any]:
    from mars_ray import storage

    out: list[Any] = []
    if run_dir:
        run = storage.upath(run_dir)
        try:
            if run.is_dir():
                out.append(run / LOGS)
        except OSError:  # an object store that cannot be reached
            pass
    out.append(Path(tempfile.gettempdir()) / "mars-logs")
    return out


def _write_into(folder: Any, name: str, body: str) -> Any:
    from mars_ray.artifacts import atomic_write_text

    path = folder / name
    atomic_write_text(path, body)
    return path


def report_error(e: BaseException, run_dir: "str | os.PathLike[str] | None", *,
                 argv: Optional[list[str]] = None) -> tuple[int, str, str]:
    """``(exit code, the line, traceback to show)`` for a failed command; writes the traceback file.

    A user error: ``(2, "mars: error: FILE: cause (full traceback: …)", "")``. Anything else:
    ``(1, "mars: internal error: Type: message (full traceback: …)", <the formatted traceback>)``.
    An error with ``log_traceback = False`` (a refused run-folder lock: the folder is not ours)
    writes no file.
    """
    user = user_error(e)
    path = None if getattr(user, "log_traceback", True) is False else write_traceback(e, run_dir, argv=argv)
    where = f" (full traceback: {path})" if path else ""
    if user is not None:
        return 2, f"mars: error: {one_line(user)}{where}", ""
    inner = [x for x in _chain(e) if not _is_ray(x)]  # what went wrong, under Ray's wrappers
    root = inner[-1] if inner else e
    return 1, f"mars: internal error: {type(root).__name__}: {one_line(root)}{where}", \
        "".join(traceback.format_exception(e))


__all__ = ["ENV_ERRNOS", "error_from_text", "is_user_error", "one_line", "report_error", "user_error",
           "write_traceback"]
