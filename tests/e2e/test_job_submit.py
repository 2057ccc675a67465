"""A real ``ray job submit`` of ``jobs/demo.yaml`` to a head node started here (``ray start --head``).

The head runs in its own temp dir and on free ports, so it never meets the in-process ``ray_local``
Ray of the other tests. It is stopped by killing exactly the processes whose command line names
that temp dir (``ray stop`` would stop every Ray on the machine). Skipped, with the reason, when the
job server does not come up.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.jobs, pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _pids_of(marker: str) -> list[int]:
    """Processes whose command line contains ``marker`` (this head's unique temp dir)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            out.append(int(proc.name))
    return out


def _stop_head(marker: str) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        pids = _pids_of(marker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while _pids_of(marker) and time.time() < deadline:
            time.sleep(0.3)


def _get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - localhost
        return json.loads(r.read().decode())


@pytest.fixture()
def head():
    if not RAY.is_file():
        pytest.skip(f"no `ray` executable next to {sys.executable}")
    temp = Path(tempfile.mkdtemp(prefix="mrj", dir="/tmp"))  # short: Ray's socket paths have a length limit
    dash = _free_port()
    ports = {"--port": _free_port(), "--dashboard-port": dash, "--ray-client-server-port": _free_port(),
             "--dashboard-agent-listen-port": _free_port(), "--dashboard-agent-grpc-port": _free_port(),
             "--runtime-env-agent-port": _free_port(), "--metrics-export-port": _free_port(),
             "--node-manager-port": _free_port(), "--object-manager-port": _free_port()}
    cmd = [str(RAY), "start", "--head", "--num-cpus", "2", "--disable-usage-stats", "--temp-dir", str(temp),
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--object-store-memory",
           str(256 * 1024 * 1024)]
    for k, v in ports.items():
        cmd += [k, str(v)]
    try:
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            pytest.skip(f"`ray start --head` failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-800:]}")
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 90
        while True:
            try:
                _get_json(f"{address}/api/version")
                break
            except Exception as e:  # noqa: BLE001
                if time.time() > deadline:
                    pytest.skip(f"the Ray job server at {address} did not answer within 90 s: {e}")
                time.sleep(1)
        yield address, temp
    finally:
        _stop_head(str(temp))
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_demo(head, tiny_data: Path, tmp_path: Path):
    address, temp = head
    # the working dir as a cluster user uploads it, minus what runtime_env.yaml excludes
    work = tmp_path / "src"
    shutil.copytree(REPO, work, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "data", "__pycache__",
                                                              "*.egg-info", ".pytest_cache"))
    shipped = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    runtime_env = {"env_vars": shipped["env_vars"], "excludes": shipped["excludes"]}  # no pip: the venv has it
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    out = tmp_path / "out"
    sub_id = f"mars-test-{os.getpid()}-{int(time.time())}"
    entry = [sys.executable, "-m", "mars_ray", "run", "--config", "jobs/demo.yaml", "--set",
             f"data.root={tiny_data}", f"data.pseudo_labels={tiny_data / 'pseudo_labels'}", "--until", "debias",
             "--out", str(out)]
    submit = [str(RAY), "job", "submit", "--address", address, "--submission-id", sub_id, "--no-wait",
              "--working-dir", str(work), "--runtime-env", str(tmp_path / "runtime_env.yaml"), "--", *entry]
    proc = subprocess.run(submit, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    deadline = time.time() + 300
    status = None
    while time.time() < deadline:
        status = _get_json(f"{address}/api/jobs/{sub_id}")["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    logs = subprocess.run([str(RAY), "job", "logs", "--address", address, sub_id], env=_env(),
                          capture_output=True, text=True, timeout=60).stdout
    print(logs[-3000:])
    assert status == "SUCCEEDED", f"job {sub_id} ended {status}:\n{logs[-3000:]}"
    # the working dir was uploaded to the cluster (the entrypoint ran from that copy of the package)
    assert list(temp.glob("session_*/runtime_resources/working_dir_files/*/mars_ray/cli.py"))
    for stage in ("features", "select", "debias"):
        m = json.loads((out / stage / "manifest.json").read_text())
        assert m["status"] == "complete", stage
    from mars_ray.data.voc import VOCDataset

    ids = VOCDataset(tiny_data).ids("train")
    assert all((out / "debias" / f"{i}.png").is_file() for i in ids)
    assert yaml.safe_load((out / "config.yaml").read_text())["select"]["alpha"] == pytest.approx(0.40)
