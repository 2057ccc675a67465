"""Any failure → one line (user errors, exit 2) or the traceback (bugs, exit 1); the full chain in RUN/logs.

The Ray, Ray Data, Ray Train and Tune wrappers are built here as those libraries build them (their
own classes, the worker traceback text Ray Data keeps); the same chains from real workers are
exercised end to end in tests/e2e/test_bad_inputs.py and tests/e2e/test_faults.py.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from mars_ray import errors

# what a Ray Data UDF failure carries back: the worker's traceback as text, the ValueError's own
# object lost when UserCodeException was pickled (its __cause__ is not pickled)
UDF_TRACE = """\
Traceback (most recent call last):
  File "/work/mars_ray/stages/features.py", line 103, in _one
    check_label(label, num_classes=self.dataset.num_classes, image_hw=image.shape[:2], path=label_path)
  File "/work/mars_ray/data/validate.py", line 50, in check_label
    raise ValueError(
ValueError: /data/pseudo_labels/train_0003.png: label values [17] outside {0..4, 254, 255}

The above exception was the direct cause of the following exception:

ray::MapWorker(MapBatches(ClusterImages)).submit() (pid=31542, ip=192.0.2.2)
ray.exceptions.UserCodeException: UDF failed to process a data block.
Failed to apply UDF transform after 1/1 attempts (total backoff 0.0s).
"""


def _task_error(cause: BaseException, trace: str = "Traceback (most recent call last):\n  ...\n") -> BaseException:
    from ray.exceptions import RayTaskError

    return RayTaskError("submit", trace, cause, proctitle="ray::w", pid=1, ip="127.0.0.1").make_dual_exception_instance()


def test_ray_task_error_unwraps_to_the_value_error():
    e = _task_error(ValueError("/d/x.png: bad"))
    assert isinstance(e, ValueError)  # Ray's dual class: not taken for the user error itself
    user = errors.user_error(e)
    assert type(user) is ValueError and str(user) == "/d/x.png: bad"


def test_ray_data_udf_error_is_read_from_the_worker_traceback():
    from ray.exceptions import UserCodeException

    e = _task_error(UserCodeException("UDF failed to process a data block."), UDF_TRACE)
    code, line, trace = errors.report_error(e, None, argv=["run"])
    assert code == 2 and trace == ""
    assert line.startswith("mars: error: /data/pseudo_labels/train_0003.png: label values [17] outside {0..4, 254, 255}")
    assert "\n" not in line


def test_ray_train_worker_group_error_unwraps_per_rank():
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    failure = UserExceptionWithTraceback(FileNotFoundError("/d/JPEGImages/a.jpg: no such file"), "Traceback …")
    e = WorkerGroupError("rank 0 failed", {0: failure})
    try:
        try:
            raise e
        except WorkerGroupError as inner:
            raise RuntimeError("train failed") from inner
    except RuntimeError as outer:
        user = errors.user_error(outer)
    assert isinstance(user, FileNotFoundError) and "a.jpg" in str(user)


def test_tune_error_text_and_a_sweep_of_failed_trials():
    from ray.tune.error import TuneError

    text = "Traceback (most recent call last):\n  File \"x\", line 1\nValueError: select.alpha must be in (0, 1], got 2.0\n"
    try:
        raise RuntimeError("tune: every trial failed (2)") from TuneError(text)
    except RuntimeError as e:
        code, line, _ = errors.report_error(e, None)
    assert code == 2 and line.startswith("mars: error: select.alpha must be in (0, 1], got 2.0")


def test_a_bug_keeps_its_traceback_and_exit_code_1(tmp_path: Path):
    try:
        raise _task_error(ZeroDivisionError("division by zero"), "Traceback …\nZeroDivisionError: division by zero\n")
    except ZeroDivisionError as e:
        code, line, trace = errors.report_error(e, tmp_path)
    assert code == 1 and line.startswith("mars: internal error: ZeroDivisionError: division by zero (full traceback: ")
    assert "Traceback" in trace
    files = list((tmp_path / "logs").glob("error-*.txt"))
    assert len(files) == 1 and str(files[0]) in line and "ZeroDivisionError" in files[0].read_text()


def test_environment_errors_are_one_line_and_other_os_errors_are_bugs():
    full = OSError(errno.ENOSPC, "No space left on device", "/run/debias/a.png")
    assert errors.report_error(full, None)[1].startswith("mars: error: /run/debias/a.png: No space left on device")
    denied = PermissionError(errno.EACCES, "Permission denied", "/ro/run")
    assert errors.report_error(denied, None)[0] == 2
    assert errors.user_error(OSError(errno.EIO, "Input/output error", "/x")) is None
    assert errors.error_from_text("OSError: [Errno 28] No space left on device: '/x'") is not None
    assert errors.error_from_text("OSError: [Errno 5] Input/output error: '/x'") is None
    assert errors.error_from_text("KeyError: 'x'") is None


def test_traceback_file_goes_to_run_logs_or_the_temp_dir(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    code, line, _ = errors.report_error(ValueError("/d: bad"), run, argv=["run", "--out", str(run)])
    (written,) = (run / "logs").glob("error-*.txt")
    assert code == 2 and line == f"mars: error: /d: bad (full traceback: {written})"
    assert written.read_text().startswith(f"mars run --out {run}")
    missing = tmp_path / "not-made"  # a config error before the run folder exists does not create it
    line = errors.report_error(ValueError("bad key"), missing)[1]
    assert not missing.exists() and "mars-logs" in line


@pytest.mark.parametrize("message", ["a\nb", "  spaced  \n\n  out "])
def test_multi_line_messages_become_one_line(message: str):
    assert "\n" not in errors.one_line(ValueError(message))
