"""What a newcomer sees: `mars run` in a real subprocess prints a start and an end line per stage,
not Ray's logs; those go to RUN/logs/mars.log, and `-v` prints them again."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mars_ray.pipeline import DESCRIPTIONS

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
STAGES = ("features", "select", "debias")
#: what Ray printed before: Ray Data's progress logs, Train's cleaner thread, worker lines, the C++ core
RAY_NOISE = ("ray.data", "PlacementGroupCleaner", "(pid=", "Running Dataset", "core_worker.cc", "streaming_executor")


def _mars(*args: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_DATA_DISABLE_PROGRESS_BARS", None)  # as a user has it: Ray Data's bars on unless we say
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "mars_ray", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout.splitlines()


def test_mars_run_prints_stage_lines_and_ray_logs_go_to_the_run_folder(tiny_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    base = ["run", "--data", str(tiny_data), "--pseudo-labels", str(tiny_data / "pseudo_labels"), "--out", str(run),
            "--until", "debias", "--set", "debias.crf=false", "ray.num_cpus=2", "ray.object_store_mb=256"]
    lines = _mars(*base)
    text = "\n".join(lines)
    assert len(lines) <= 25, text
    for stage in STAGES:
        assert re.search(rf"^\d\d:\d\d:\d\d {stage} +{re.escape(DESCRIPTIONS[stage])}$", text, re.M), stage
        assert re.search(rf"^\d\d:\d\d:\d\d {stage} +done in \d+\.\d s → \S*{stage}", text, re.M), stage
    assert not [n for n in RAY_NOISE if n in text], text
    assert "-v prints them here" in text and f"report: {run / 'report' / 'index.html'}" in text
    log = (run / "logs" / "mars.log").read_text()
    assert re.search(r" DEBUG mars_ray\.", log)  # our full debug log
    assert "INFO ray.data" in log and "Starting execution of Dataset" in log  # Ray's loggers
    assert "session logs" in log and "/logs" in log  # … and where Ray's own session logs are
    assert (run / "logs" / "stderr.log").is_file()  # what Ray's C++ core writes to the process's stderr

    # -v: Ray's lines are back on the terminal; select and debias rerun (alpha changed), features is up to date
    lines = _mars("-v", *base, "select.alpha=0.5")
    text = "\n".join(lines)
    assert "Starting execution of Dataset" in text and "ray.data" in text
    assert re.search(r"^\d\d:\d\d:\d\d features +up to date, skipped", text, re.M)
    assert re.search(r"^\d\d:\d\d:\d\d debias +done in ", text, re.M)

    # nothing changed: three "up to date" lines, Ray not even started
    lines = _mars(*base, "select.alpha=0.5")
    text = "\n".join(lines)
    assert len(lines) <= 10 and text.count("up to date, skipped") == 3, text
    assert "Ray 2." not in text and not [n for n in RAY_NOISE if n in text]
