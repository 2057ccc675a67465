"""What a person sees in the terminal, and where everything else goes.

The library never prints: it logs. Two kinds of records carry a structured event for the terminal,
on the ``mars_ray.progress`` logger:

* a stage starting and ending (:func:`stage`): name, what it does, seconds, where the output went,
  whether it was up to date and skipped, and a one-line summary;
* the progress of one pass (:class:`Progress`: images done / total, or epoch k/N with loss and
  val mIoU), sent by ``stages.runtime`` from counts taken where the work happens.

``mars`` (``cli.main``) calls :func:`setup` first and :func:`close` last. Between them:

* the terminal (stderr) shows the stage lines, a progress bar when it is a terminal (a line every
  10 % at most every 10 s, or every 30 s, when it is not: job logs), warnings and errors, and the
  few INFO lines marked ``extra=SHOW`` (e.g. which image-label file was read);
* ``RUN/logs/mars.log`` receives everything: our DEBUG log, Ray's Python loggers (``ray``,
  ``ray.data``, ``ray.train``, ``ray.tune``), the stdout/stderr of Ray's workers that Ray forwards
  to the driver, and Python warnings; ``RUN/logs/stderr.log`` what native code (Ray's C++ core)
  writes straight to the process's stderr. Ray's own session logs stay in Ray's temp dir; the
  log file names it;
* ``-v`` puts all of that back on the terminal, as Ray prints it (and it still goes to the file).

Everything :func:`setup` changes in the process (root handlers and level, the ``mars_ray`` level,
Ray's logger handlers, Ray's worker-output printer, Ray Data's progress-bar switch, warnings
capture, file descriptor 2) is put back by :func:`close`.

At ~680 lines this is over the house's ~450: the events, their formatting and the session that
routes them share one state (the current session decides whether progress is counted and where a
record goes); a split would make the halves import each other. The four parts are marked by
``# --`` headers.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, TextIO

logger = logging.getLogger(__name__)

#: the logger of stage and progress events (under ``mars_ray``: DEBUG reaches the handlers)
EVENTS = "mars_ray.progress"
#: where the stdout/stderr lines of Ray's workers go (forwarded to the driver by Ray)
RAY_OUTPUT = "mars_ray.ray_output"
#: ``logger.info(..., extra=SHOW)``: an INFO line the terminal shows without ``-v``
SHOW = {"mars_show": True}

NAME_WIDTH = 9  # "features " … the stage-name column
HEARTBEAT_S = 30.0  # not a terminal: a progress line at least this often while a pass runs
MIN_GAP_S = 10.0  # … and at most one per 10 % step this often
REDRAW_S = 0.2  # a terminal: redraw the bar at most this often


# -- events (library side: log them, never print) ------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """One pass of work: ``done`` of ``total`` images (``unit="img"``) or epochs (``unit="epoch"``).

    ``elapsed``: seconds since the pass began; ``per_item``: seconds per unit when measured
    directly (epochs: from the last two epochs of the phase), else the rate is ``done / elapsed``;
    ``metrics``: shown after the count (``loss``, ``val_miou`` as a fraction); ``finished``: the
    last event of the pass.
    """

    task: str
    label: str
    done: int
    total: int | None
    elapsed: float
    unit: str = "img"
    metrics: Mapping[str, float] = field(default_factory=dict)
    finished: bool = False
    per_item: float | None = None
    stage: int = 0  # the StageEvent.id of the stage the pass belongs to (``current_stage()`` when it began)

    @property
    def fraction(self) -> float | None:
        return None if not self.total else min(1.0, self.done / self.total)


@dataclass(frozen=True)
class StageEvent:
    """A stage (or a step of a command, e.g. the demo's label evaluation) starting, ending or failing."""

    kind: str  # "start" | "end" | "failed"
    name: str
    what: str = ""
    seconds: float = 0.0
    out: str = ""
    status: str = "done"  # end: "done" | "up to date" | "reused"
    summary: str = ""
    id: int = 0  # one per stage run: its passes' progress events carry it


def report_progress(p: Progress) -> None:
    """Log one progress event (DEBUG; the console renders it, the log file keeps a few)."""
    logging.getLogger(EVENTS).debug("%s", format_progress(p), extra={"mars_event": p})


class StageRun:
    """Handed out by :func:`stage`; the caller fills in what the end line says."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.t0 = time.perf_counter()
        self.out = ""
        self.status = "done"
        self.summary = ""

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def finish(self, out: Any = "", *, status: str = "done", summary: str = "") -> None:
        self.out, self.status, self.summary = str(out), status, summary


_stage_ids = itertools.count(1)
_open_stage = 0


def current_stage() -> int:
    """The id of the stage running now (0: none); a pass that begins records it in its events."""
    return _open_stage


@contextmanager
def stage(name: str, what: str) -> Iterator[StageRun]:
    """``with stage("features", "USS features …") as st: … st.finish(out, status=…, summary=…)``:
    a start line now, an end line (or a "failed" line, then the exception goes on) after."""
    global _open_stage
    log = logging.getLogger(EVENTS)
    sid, outer = next(_stage_ids), _open_stage
    _log_event(log, StageEvent("start", name, what, id=sid))
    _open_stage = sid
    st = StageRun(name)
    try:
        yield st
    except BaseException:
        _log_event(log, StageEvent("failed", name, what, id=sid, seconds=st.seconds))
        raise
    finally:
        _open_stage = outer
    _log_event(log, StageEvent("end", name, what, id=sid, seconds=st.seconds, out=st.out, status=st.status,
                               summary=st.summary))


def _log_event(log: logging.Logger, e: StageEvent) -> None:
    log.info("%s", format_stage(e), extra={"mars_event": e})


# -- formatting (pure) ----------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """``42.3`` → ``"0:42"``, ``3725`` → ``"1:02:05"``."""
    s = int(round(max(0.0, seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _short_path(out: str) -> str:
    """A local path under the working directory, relative to it (``runs/demo/run/features``)."""
    if not out or "://" in out or not os.path.isabs(out):
        return out
    try:
        rel = os.path.relpath(out)
    except ValueError:
        return out
    return out if rel.startswith("..") else rel


def format_stage(e: StageEvent) -> str:
    """The text of a stage line, without the clock: ``features  done in 30.7 s → runs/x/features (…)``."""
    name = f"{e.name:<{NAME_WIDTH}}"
    if e.kind == "start":
        return f"{name} {e.what}" if e.what else f"{name} started"
    if e.kind == "failed":
        return f"{name} failed after {e.seconds:.1f} s"
    where = f" → {_short_path(e.out)}" if e.out else ""
    head = {"up to date": "up to date, skipped", "reused": "reused from the features cache"}.get(e.status)
    text = f"{name} {head} ({e.seconds:.1f} s){where}" if head else f"{name} done in {e.seconds:.1f} s{where}"
    return f"{text}  ({e.summary})" if e.summary else text


def _metric_text(metrics: Mapping[str, float]) -> str:
    parts = []
    for key, value in metrics.items():
        if value is None or not isinstance(value, (int, float)) or math.isnan(value):
            continue
        if key == "val_miou":
            parts.append(f"val mIoU {100 * value:.1f}")
        else:
            parts.append(f"{key} {value:.4g}")
    return "  ".join(parts)


def _seconds_per_item(p: Progress) -> float | None:
    if p.per_item is not None:
        return p.per_item if p.per_item > 0 else None
    if p.unit == "epoch" or p.done <= 0 or p.elapsed <= 0:  # epochs: only measured ones (phases differ)
        return None
    return p.elapsed / p.done


def _rate_text(p: Progress) -> str:
    s = _seconds_per_item(p)
    if s is None:
        return ""
    if p.unit == "epoch":
        return f"{format_duration(s)}/epoch"
    return f"{1 / s:.1f} {p.unit}/s" if s <= 1 else f"{s:.1f} s/{p.unit}"


def _eta_text(p: Progress) -> str:
    s = _seconds_per_item(p)
    if p.finished or not p.total or s is None:
        return ""
    return f"ETA {format_duration((p.total - p.done) * s)}"


def _bar(fraction: float | None, width: int, unicode: bool) -> str:
    full, empty = ("█", "░") if unicode else ("#", "-")
    if fraction is None:
        return empty * width
    n = int(round(fraction * width))
    return full * n + empty * (width - n)


def format_progress(p: Progress, *, bar_width: int = 0, unicode: bool = True) -> str:
    """One progress line: ``images 12/16 img (75%)  3.1 img/s  ETA 0:02`` (``bar_width=0``), or
    with a bar of ``bar_width`` cells instead of the percentage: ``images ████░ 12/16 img …``;
    epochs: ``epoch 1/2 (50%)  0:45/epoch  ETA 0:45  loss 1.27  val mIoU 41.2``."""
    total = "?" if p.total is None else str(p.total)
    if p.unit == "epoch":
        count = f"{p.label} {p.done}/{total}" if p.done else f"first {p.label} running"
    elif p.label in ("", "images"):
        count = f"{p.done}/{total} {p.unit}"
    else:
        count = f"{p.label} {p.done}/{total} {p.unit}"
    frac = p.fraction
    if bar_width:
        head = f"{_bar(frac, bar_width, unicode)} {count}"
    else:
        head = count + (f" ({100 * frac:.0f}%)" if frac is not None else "")
    parts = [head, _rate_text(p), _eta_text(p), _metric_text(p.metrics)]  # a narrow terminal cuts the metrics
    return "  ".join(x for x in parts if x)


class LineThrottle:
    """Not a terminal: which progress events become a line. A pass prints when it crosses a new
    10 % step at least ``min_gap`` s after its last line, or after ``heartbeat`` s in any case
    (so a job log shows a stalled pass too); its first and last events print nothing (the stage
    lines say when it starts and ends)."""

    def __init__(self, *, min_gap: float = MIN_GAP_S, heartbeat: float = HEARTBEAT_S) -> None:
        self.min_gap, self.heartbeat = min_gap, heartbeat
        self._last: dict[str, tuple[float, int]] = {}  # task → (time of its last line, its 10 % step)

    def __call__(self, p: Progress, now: float) -> bool:
        step = int(10 * p.fraction) if p.fraction is not None else -1
        last = self._last.get(p.task)
        if p.finished:
            self._last.pop(p.task, None)
            return False
        if last is None:
            self._last[p.task] = (now, step)
            return False
        t, last_step = last
        due = (step > last_step and now - t >= self.min_gap) or now - t >= self.heartbeat
        if due:
            self._last[p.task] = (now, step)
        return due


# -- handlers -------------------------------------------------------------------------------------


def _is_ray(record: logging.LogRecord) -> bool:
    return record.name == "ray" or record.name.startswith("ray.") or record.name in (RAY_OUTPUT, "py.warnings")


class ConsoleHandler(logging.Handler):
    """The terminal: stage lines, one progress bar (a terminal) or throttled progress lines (not
    one), warnings and errors, and the INFO lines marked ``SHOW``; with ``verbose`` every record
    (Ray's too), and progress as lines. Writes to ``stream`` or, by default, to whatever
    ``sys.stderr`` is when a record comes."""

    def __init__(self, *, verbose: bool = False, stream: TextIO | None = None, tty: bool | None = None,
                 clock: Any = time.monotonic) -> None:
        super().__init__(logging.DEBUG)
        self.verbose = verbose
        self._stream = stream
        out = self.stream
        self.tty = (not verbose) and (out.isatty() if tty is None else tty)
        encoding = (getattr(out, "encoding", None) or "").lower().replace("-", "")
        self.unicode = encoding in ("utf8", "utf_8")
        self._clock = clock
        self._throttle = LineThrottle()
        self._stage = ""
        self._stage_id = 0  # StageEvent.id of the open stage, 0 when none
        self._bar = ""  # the bar drawn on the current terminal line, "" when none
        self._drawn_at = -math.inf

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def wants(self, record: logging.LogRecord) -> bool:
        if getattr(record, "mars_event", None) is not None:
            return True
        if record.name == RAY_OUTPUT:
            return False  # in -v Ray prints its workers' lines itself
        if self.verbose:
            return record.levelno >= (logging.DEBUG if record.name.startswith("mars_ray") else logging.INFO)
        if _is_ray(record):
            return False
        return record.levelno >= logging.WARNING or bool(getattr(record, "mars_show", False))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if not self.wants(record):
                return
            event = getattr(record, "mars_event", None)
            if isinstance(event, Progress):
                self._progress(event)
            elif isinstance(event, StageEvent):
                started = event.kind == "start"
                self._stage, self._stage_id = (event.name, event.id) if started else ("", 0)
                self._line(f"{_clock(record)} {format_stage(event)}")
            else:
                self._line(self._plain(record))
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)

    def _plain(self, record: logging.LogRecord) -> str:
        if self.verbose:
            text = f"{_clock(record)} {record.levelname} {record.name}: {record.getMessage()}"
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            return text
        message = record.getMessage().splitlines()[0] if record.getMessage() else ""
        if record.levelno >= logging.WARNING:
            message = f"{'error' if record.levelno >= logging.ERROR else 'warning'}: {message}"
        return f"{_clock(record)} {message}"

    def _progress(self, p: Progress) -> None:
        if p.stage != self._stage_id:  # a late event of a stage that has ended (the poller lags)
            return
        prefix = f"{' ' * 8} {self._stage or p.label:<{NAME_WIDTH}}"
        now = self._clock()
        if self.tty:
            if not p.finished and now - self._drawn_at < REDRAW_S:
                return
            width = shutil.get_terminal_size((100, 24)).columns
            text = f"{prefix} {format_progress(p, bar_width=20, unicode=self.unicode)}"[: width - 1]
            self.stream.write("\r" + text + "\x1b[K")
            self._bar, self._drawn_at = text, now
            if p.finished and not self._stage:  # no end line will replace it: keep it, on its own line
                self.stream.write("\n")
                self._bar = ""
            self.stream.flush()
        elif self._throttle(p, now):
            self._line(f"{time.strftime('%H:%M:%S')} {prefix[9:]} {format_progress(p)}")

    def _line(self, text: str) -> None:
        out = self.stream
        if self._bar:
            out.write("\r\x1b[K")
        out.write(text + "\n")
        if self._bar:
            self._bar = ""  # the next progress event draws it again
        out.flush()

    def clear(self) -> None:
        if self._bar:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._bar = ""


def _clock(record: logging.LogRecord) -> str:
    return time.strftime("%H:%M:%S", time.localtime(record.created))


class _FileFilter(logging.Filter):
    """The log file keeps progress events at the pace of a non-terminal console, and Ray's records
    from INFO up (Ray Data's DEBUG records, e.g. operator metrics every 5 s, stay in its own
    ``ray-data.log``)."""

    def __init__(self) -> None:
        super().__init__()
        self._throttle = LineThrottle()

    def filter(self, record: logging.LogRecord) -> bool:
        event = getattr(record, "mars_event", None)
        if isinstance(event, Progress):
            return self._throttle(event, time.monotonic())
        return record.levelno >= logging.INFO or not _is_ray(record)


# -- the session: set up by `mars`, undone at its end ---------------------------------------------


class _Buffer(logging.Handler):
    """Holds the records logged before a deferred log file opens (:func:`open_log`)."""

    def __init__(self, limit: int = 10_000) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.limit = limit

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.limit:
            self.records.append(record)


class _Session:
    def __init__(self, verbose: bool, log_dir: Any, defer: bool = False) -> None:
        self.verbose = verbose
        self.log_dir = log_dir
        self.defer = defer and log_dir is not None  # open the files once the run folder is ours
        self._buffer: _Buffer | None = None
        self.log_path: Any = None  # RUN/logs/mars.log (local path or ObjectPath)
        self._local_log: str | None = None  # where the file handler writes (a temp file for URIs)
        self._local_err: str | None = None
        self._undo: list[Any] = []  # callables, run in reverse by close()
        self._ray_routed = False
        self.console = ConsoleHandler(verbose=verbose)
        self.file: logging.Handler | None = None

    # setup ------------------------------------------------------------------------------------
    def start(self) -> None:
        root = logging.getLogger()
        pkg = logging.getLogger("mars_ray")
        root_level, pkg_level = root.level, pkg.level
        root.setLevel(logging.INFO)  # third-party INFO; our DEBUG (the package logger's level)
        pkg.setLevel(logging.DEBUG)
        self._undo.append(lambda: (root.setLevel(root_level), pkg.setLevel(pkg_level)))
        root.addHandler(self.console)
        self._undo.append(lambda: root.removeHandler(self.console))
        captured = logging._warnings_showwarning is not None  # type: ignore[attr-defined]
        logging.captureWarnings(True)
        self._undo.append(lambda: logging.captureWarnings(captured))
        if self.defer:
            self._buffer = _Buffer()
            root.addHandler(self._buffer)
            self._undo.append(lambda: root.removeHandler(self._buffer) if self._buffer else None)
        elif self.log_dir is not None:
            self.open_log()
        logger.debug("mars %s (pid %d, cwd %s); log file %s", " ".join(sys.argv[1:]), os.getpid(), os.getcwd(),
                     self.log_path)
        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():  # started before this command (a notebook, a test): no terminal line
                self.route_ray(announce=False)

    def open_log(self) -> None:
        """Open ``RUN/logs/mars.log`` (and ``stderr.log``); a deferred session's buffered records go
        there first. A second ``mars`` refused by the run-folder lock never gets here: it writes
        nothing into a folder another process holds."""
        if self.file is not None or self.log_dir is None:
            return
        self._open_files()
        root = logging.getLogger()
        root.addHandler(self.file)
        file = self.file
        self._undo.append(lambda: (root.removeHandler(file), file.close()))
        if self._buffer is not None:
            root.removeHandler(self._buffer)
            for record in self._buffer.records:
                file.handle(record)  # applies the file's filter once (its progress throttle keeps state)
            self._buffer = None
        if not self.verbose:
            self._capture_fd2()

    def _open_files(self) -> None:
        from mars_ray import storage

        self.log_path = self.log_dir / "mars.log"
        if storage.is_uri(self.log_dir):  # written locally, uploaded by close() (appended to what is there)
            fd, self._local_log = tempfile.mkstemp(prefix="mars-", suffix=".log")
            os.close(fd)
            if self.log_path.is_file():
                with open(self._local_log, "wb") as f:
                    f.write(self.log_path.read_bytes())
            fd, self._local_err = tempfile.mkstemp(prefix="mars-stderr-", suffix=".log")
            os.close(fd)
        else:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._local_log = str(self.log_path)
            self._local_err = str(self.log_dir / "stderr.log")
        self.file = logging.FileHandler(self._local_log, encoding="utf-8")
        self.file.setLevel(logging.DEBUG)
        self.file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.file.addFilter(_FileFilter())

    def _capture_fd2(self) -> None:
        """Native code (Ray's C++ core logs an error line for every Ray Data actor pool, ray#57733)
        writes to file descriptor 2, not through ``sys.stderr``: point fd 2 at ``stderr.log`` and
        ``sys.stderr`` at a copy of the terminal. Only for the real stderr (not under a capture)."""
        try:
            real = sys.stderr.fileno() == 2
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            real = False
        if not real or self._local_err is None:
            return
        sys.stderr.flush()
        saved = os.dup(2)
        terminal = open(saved, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace",
                        closefd=False)
        err = os.open(self._local_err, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(err, 2)
        os.close(err)
        old = sys.stderr
        sys.stderr = terminal

        def undo() -> None:
            terminal.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sys.stderr = old

        self._undo.append(undo)

    # Ray --------------------------------------------------------------------------------------
    def route_ray(self, announce: bool = True) -> None:
        """Ray's loggers into ours (the file; the terminal with ``-v``), its workers' forwarded
        output into ``mars_ray.ray_output``, and Ray Data's progress bars off (ours replace them)."""
        import ray
        import ray.data  # configures the "ray.data" logger: adopt it now

        for name in sorted(n for n in logging.root.manager.loggerDict if n == "ray" or n.startswith("ray.")):
            lg = logging.getLogger(name)
            streams = [h for h in lg.handlers if isinstance(h, logging.StreamHandler)
                       and not isinstance(h, logging.FileHandler)]
            if not streams and lg.propagate:
                continue
            handlers = list(lg.handlers)
            for h in streams:
                lg.removeHandler(h)
            propagate = lg.propagate
            lg.propagate = True
            self._undo.append(lambda lg=lg, handlers=handlers, propagate=propagate: (
                setattr(lg, "handlers", handlers), setattr(lg, "propagate", propagate)))
        if not self._ray_routed and ray.is_initialized():
            self._ray_routed = True
            self._route_worker_output()
            if not self.verbose:
                ctx = ray.data.DataContext.get_current()
                bars = ctx.enable_progress_bars
                ctx.enable_progress_bars = False
                self._undo.append(lambda: setattr(ctx, "enable_progress_bars", bars))
            self._say_where(ray, announce)

    def _route_worker_output(self) -> None:
        try:  # Ray's own (private) hook for the lines it forwards: the one way to take them over
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
            from ray._private.worker import filter_autoscaler_events
        except ImportError:  # another Ray version: its workers' output prints as Ray prints it
            logger.debug("Ray's worker-output dispatcher not found; workers' output is not routed")
            return

        out = logging.getLogger(RAY_OUTPUT)

        def to_log(data: Mapping[str, Any]) -> None:
            lines = data.get("lines", [])
            if data.get("pid") == "autoscaler":  # its events only, as Ray prints them (not its status dumps)
                lines = filter_autoscaler_events(lines)
            who = data.get("actor_name") or data.get("task_name") or ""
            prefix = f"({who + ' ' if who else ''}pid={data.get('pid')})"
            for line in lines:
                if "__ray_tqdm_magic_token__" not in line:
                    out.info("%s %s", prefix, line)

        printers = [] if self.verbose else [h for h in dispatcher.handlers if h[0] == "ray_print_logs"]
        if printers:
            dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("mars_ray_output", to_log)

        def undo() -> None:
            import ray

            dispatcher.remove_handler("mars_ray_output")
            if printers and ray.is_initialized() and not any(n == "ray_print_logs" for n, _ in dispatcher.handlers):
                dispatcher.add_handler(*printers[0])

        self._undo.append(undo)

    def _say_where(self, ray: Any, announce: bool = True) -> None:
        try:  # no public API names the session folder
            session_logs = ray._private.worker._global_node.get_logs_dir_path()
        except AttributeError:
            session_logs = "Ray's session folder on the head node (/tmp/ray/session_latest/logs)"
        logger.info("Ray %s: session logs (raylet, GCS, every worker's stdout/stderr, ray-data*.log) in %s",
                    ray.__version__, session_logs)
        where = f"its logs go to {_short_path(str(self.log_path))}" if self.log_path else f"its logs: {session_logs}"
        if not self.verbose and announce:
            logger.info("Ray %s: %s (-v prints them here)", ray.__version__, where, extra=SHOW)

    # teardown ---------------------------------------------------------------------------------
    def close(self) -> None:
        self.console.clear()
        while self._undo:
            self._undo.pop()()
        if self._local_log and self.log_path is not None and self._local_log != str(self.log_path):
            # an object-store run folder: upload the local copies (each one upload, atomic there)
            with open(self._local_log, "rb") as f:
                self.log_path.write_bytes(f.read())
            os.unlink(self._local_log)
            if self._local_err:
                with open(self._local_err, "rb") as f:
                    data = f.read()
                if data:
                    (self.log_dir / "stderr.log").write_bytes(data)
                os.unlink(self._local_err)


_lock = threading.Lock()
_current: _Session | None = None


def setup(verbose: bool = False, log_dir: Any = None, *, defer: bool = False) -> None:
    """Route the process's logging for ``mars`` (see the module docstring); ``log_dir``: the run's
    ``RUN/logs`` folder (a local path or an object-store path), or ``None``: no log file.

    ``defer``: the commands that hold a run folder open the log file only when they hold it
    (:func:`open_log`, called by ``runlock.run_lock``); what they log before is kept and written then.
    """
    global _current
    with _lock:
        if _current is not None:
            _current.close()
        _current = _Session(verbose, log_dir, defer)
        _current.start()


def open_log() -> None:
    """Open the deferred log file of the current session (no-op without one, or when open)."""
    if _current is not None:
        _current.open_log()


def close() -> None:
    """Undo :func:`setup` (no-op without one)."""
    global _current
    with _lock:
        session, _current = _current, None
    if session is not None:
        session.close()


def active() -> bool:
    """A ``mars`` console is listening: worth counting progress for."""
    return _current is not None


def log_path() -> Any:
    """``RUN/logs/mars.log`` of the current session, or ``None``."""
    return _current.log_path if _current is not None else None


def route_ray() -> None:
    """Called once Ray is up (``runtime.ensure_ray``): route its logs as :func:`setup` said."""
    if _current is not None:
        _current.route_ray()


__all__ = ["EVENTS", "SHOW", "Progress", "StageEvent", "StageRun", "ConsoleHandler", "LineThrottle", "active",
           "close", "format_duration", "format_progress", "format_stage", "log_path", "open_log", "report_progress",
           "route_ray", "setup", "stage"]
