"""The terminal: progress formatting (a terminal vs job logs), the handler, and setup/close leaving
the process as it found it."""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

import pytest

from mars_ray import console
from mars_ray.console import ConsoleHandler, LineThrottle, Progress, StageEvent, format_progress, format_stage


def _p(done: int, total: int | None = 16, elapsed: float = 4.0, **kw) -> Progress:
    return Progress(task=kw.pop("task", "t"), label=kw.pop("label", "images"), done=done, total=total,
                    elapsed=elapsed, **kw)


def test_format_progress_lines_and_bars() -> None:
    assert format_progress(_p(12)) == "12/16 img (75%)  3.0 img/s  ETA 0:01"
    assert format_progress(_p(12), bar_width=8, unicode=False) == "######-- 12/16 img  3.0 img/s  ETA 0:01"
    assert format_progress(_p(12), bar_width=4) == "███░ 12/16 img  3.0 img/s  ETA 0:01"
    assert format_progress(_p(2, elapsed=10.0, label="val predictions")) == \
        "val predictions 2/16 img (12%)  5.0 s/img  ETA 1:10"
    assert format_progress(_p(0, total=None)) == "0/? img"  # nothing counted yet: no rate, no ETA
    assert format_progress(_p(16, finished=True)) == "16/16 img (100%)  4.0 img/s"
    # epochs: rate and ETA only from measured epochs of the phase (its first has none)
    epoch = Progress("e", "epoch", 1, 2, 30.0, unit="epoch", metrics={"loss": 1.25, "val_miou": 0.4123})
    assert format_progress(epoch) == "epoch 1/2 (50%)  loss 1.25  val mIoU 41.2"
    assert format_progress(Progress("e", "epoch", 0, None, 40.0, unit="epoch")) == "first epoch running"
    stego = Progress("e", "stego epoch", 3, 20, 9999.0, unit="epoch", per_item=2433.3, metrics={"loss": 0.5})
    assert format_progress(stego) == "stego epoch 3/20 (15%)  40:33/epoch  ETA 11:29:26  loss 0.5"


def test_format_stage_lines() -> None:
    assert format_stage(StageEvent("start", "features", "USS features")) == "features  USS features"
    assert format_stage(StageEvent("end", "select", seconds=6.04, out="/x/select", summary="16 chosen")) == \
        "select    done in 6.0 s → /x/select  (16 chosen)"
    assert format_stage(StageEvent("end", "debias", seconds=0.1, out="/x/debias", status="up to date")) == \
        "debias    up to date, skipped (0.1 s) → /x/debias"
    assert format_stage(StageEvent("failed", "train", seconds=3.2)) == "train     failed after 3.2 s"


def test_line_throttle_every_ten_percent_at_most_every_min_gap_and_a_heartbeat() -> None:
    th = LineThrottle(min_gap=10.0, heartbeat=30.0)
    assert not th(_p(0, 100), now=0.0)  # the first event: the start line said it
    assert not th(_p(15, 100), now=5.0)  # a new 10 % step, but too soon
    assert th(_p(16, 100), now=10.0)
    assert not th(_p(19, 100), now=25.0)  # same step, no heartbeat yet
    assert th(_p(19, 100), now=40.1)  # stalled: a line every 30 s anyway
    assert th(_p(95, 100), now=50.2)
    assert not th(_p(100, 100, finished=True), now=70.0)  # the end line says it


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _feed(handler: ConsoleHandler, clock: _Clock) -> None:
    log = logging.getLogger("test.console.feed")
    log.propagate = False
    log.handlers = [handler]
    log.setLevel(logging.DEBUG)
    log.info("x", extra={"mars_event": StageEvent("start", "features", "USS features", id=7)})
    for i, t in enumerate((0.0, 0.1, 11.0, 22.0, 33.0)):
        clock.t = t
        log.debug("x", extra={"mars_event": _p(4 * i, 16, elapsed=t + 1, stage=7)})
    log.warning("disk nearly full")
    log.info("chatter nobody asked for")
    logging.getLogger("ray.data").propagate = True  # a Ray record reaching our handler
    rec = logging.LogRecord("ray.data", logging.WARNING, __file__, 1, "Progress bars disabled", None, None)
    handler.handle(rec)
    log.info("image labels: 16 ids matched", extra=console.SHOW)
    clock.t = 34.0
    log.debug("x", extra={"mars_event": _p(16, 16, elapsed=35.0, finished=True, stage=7)})
    log.info("x", extra={"mars_event": StageEvent("end", "features", seconds=35.0, out="/r/features", id=7)})
    log.debug("x", extra={"mars_event": _p(16, 16, elapsed=35.5, finished=True, stage=7, task="late")})


def test_console_handler_in_a_terminal_draws_one_bar() -> None:
    out, clock = io.StringIO(), _Clock()
    _feed(ConsoleHandler(stream=out, tty=True, clock=clock), clock)  # StringIO has no encoding: ASCII bars
    text = out.getvalue()
    bars = [seg.replace("\x1b[K", "") for seg in text.split("\r") if "img" in seg]
    # drawn at 0, 11, 22, 33 and the finish; the redraw 0.1 s after the first was skipped
    assert [b.split("features  ")[1].split(" img")[0] + " img" for b in bars] == [
        "-------------------- 0/16 img", "##########---------- 8/16 img", "###############----- 12/16 img",
        "#################### 16/16 img", "#################### 16/16 img"]
    assert bars[2].startswith("         features  ") and bars[2].endswith("1.9 s/img  ETA 0:08")
    lines = [seg.rsplit("\r", 1)[-1].replace("\x1b[K", "") for seg in text.split("\n")]
    printed = [ln for ln in lines if ln]
    assert len(printed) == 4 and text.count("\n") == 4  # progress never adds a line
    assert printed[0].endswith(" features  USS features")
    assert printed[1].endswith(" warning: disk nearly full") and printed[2].endswith(" image labels: 16 ids matched")
    assert printed[3].endswith(" features  done in 35.0 s → /r/features")
    assert "chatter" not in text and "Progress bars disabled" not in text


def test_console_handler_not_a_terminal_prints_throttled_lines() -> None:
    out, clock = io.StringIO(), _Clock()
    _feed(ConsoleHandler(stream=out, tty=False, clock=clock), clock)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    # progress at 0 s (first: silent), 0.1 s (too soon), 11, 22 and 33 s (a new 10 % step each), then finished
    assert [ln[9:] for ln in lines] == [
        "features  USS features",
        "features  8/16 img (50%)  1.5 s/img  ETA 0:12",
        "features  12/16 img (75%)  1.9 s/img  ETA 0:08",
        "features  16/16 img (100%)  2.1 s/img  ETA 0:00",
        "warning: disk nearly full",
        "image labels: 16 ids matched",
        "features  done in 35.0 s → /r/features",
    ]


def test_a_pass_outside_any_stage_keeps_its_last_bar_on_its_own_line() -> None:
    out, clock = io.StringIO(), _Clock()
    handler = ConsoleHandler(stream=out, tty=True, clock=clock)
    handler.handle(logging.makeLogRecord({"name": console.EVENTS, "levelno": logging.DEBUG, "msg": "x",
                                          "mars_event": _p(16, 16, finished=True, label="convert")}))
    assert out.getvalue().endswith("#################### convert 16/16 img  4.0 img/s\x1b[K\n")


def test_verbose_shows_every_record_but_workers_output() -> None:
    out = io.StringIO()
    handler = ConsoleHandler(stream=out, verbose=True)
    assert not handler.tty
    for name, level, shown in (("ray.data", logging.INFO, True), ("ray.data", logging.DEBUG, False),
                               ("mars_ray.stages.debias", logging.DEBUG, True),
                               (console.RAY_OUTPUT, logging.INFO, False)):  # Ray prints those itself in -v
        rec = logging.LogRecord(name, level, __file__, 1, "msg-" + name, None, None)
        assert handler.wants(rec) is shown, name


@pytest.mark.parametrize("verbose", [False, True])
def test_setup_routes_ray_to_the_file_and_close_restores_everything(tmp_path: Path, capsys, verbose: bool) -> None:
    import ray  # noqa: F401 - its "ray" logger with its own stderr handler, as in a real run

    root, pkg, ray_log = logging.getLogger(), logging.getLogger("mars_ray"), logging.getLogger("ray")
    before = (list(root.handlers), root.level, pkg.level, list(ray_log.handlers), ray_log.propagate,
              logging._warnings_showwarning, sys.stderr)  # type: ignore[attr-defined]
    console.setup(verbose, tmp_path / "logs")
    try:
        console.route_ray()  # Ray not started: its loggers are adopted, nothing else
        assert console.active() and console.log_path() == tmp_path / "logs" / "mars.log"
        logging.getLogger("ray.data._internal.test").info("operator log line")
        logging.getLogger("ray.data._internal.test").debug("operator debug line")
        logging.getLogger("mars_ray.stages.test").debug("our debug line")
        logging.getLogger("mars_ray.stages.test").warning("our warning")
    finally:
        console.close()
    after = (list(root.handlers), root.level, pkg.level, list(ray_log.handlers), ray_log.propagate,
             logging._warnings_showwarning, sys.stderr)  # type: ignore[attr-defined]
    assert after == before and not console.active()
    log = (tmp_path / "logs" / "mars.log").read_text()
    assert "INFO ray.data._internal.test: operator log line" in log
    assert "operator debug line" not in log  # Ray's DEBUG stays in Ray's own files
    assert "DEBUG mars_ray.stages.test: our debug line" in log and "our warning" in log
    err = capsys.readouterr().err
    assert "our warning" in err
    assert ("operator log line" in err) is verbose and ("our debug line" in err) is verbose
