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
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e.ray_head import RAY, get_json, node_temp_dir, node_ports, ray_env, stop_nodes

pytestmark = [pytest.mark.jobs, pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def head():
    temp = node_temp_dir("mrj")
    ports = node_ports(head=True)
    dash = ports["--dashboard-port"]
    cmd = [str(RAY), "start", "--head", "--num-cpus", "2", "--disable-usage-stats", "--temp-dir", str(temp),
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--object-store-memory",
           str(256 * 1024 * 1024)]
    for k, v in ports.items():
        cmd += [k, str(v)]
    try:
        proc = subprocess.run(cmd, env=ray_env(), capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            pytest.skip(f"`ray start --head` failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-800:]}")
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 90
        while True:
            try:
                get_json(f"{address}/api/version")
                break
            except Exception as e:  # noqa: BLE001
                if time.time() > deadline:
                    pytest.skip(f"the Ray job server at {address} did not answer within 90 s: {e}")
                time.sleep(1)
        yield address, temp
    finally:
        stop_nodes(str(temp))
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
    proc = subprocess.run(submit, env=ray_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    deadline = time.time() + 300
    status = None
    while time.time() < deadline:
        status = get_json(f"{address}/api/jobs/{sub_id}")["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    logs = subprocess.run([str(RAY), "job", "logs", "--address", address, sub_id], env=ray_env(),
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
