"""The placement of jobs/coco.yaml's actors and Train workers on a simulated 8-GPU, 64-CPU cluster.

Two Ray nodes started here with ``ray start`` (32 logical CPUs and 4 logical GPUs each, their own
temp dir and free ports, no worker prestart), joined into one cluster; ``benchmarks/cluster_check.py``
then places every stage's requests with placement groups and starts real probes: a Ray Data pool
with the features and evaluate stages' per-actor resources and the train stage's 8 Ray Train
workers (gloo backend: logical GPUs, no CUDA). Placement is checked, not speed. The nodes are
stopped by killing exactly their processes (``ray_head.stop_nodes``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.ray_head import RAY, node_temp_dir, node_ports, ray_env, stop_nodes

pytestmark = [pytest.mark.jobs, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
NODE = ["--num-cpus", "32", "--num-gpus", "4", "--object-store-memory", str(80 * 1024 * 1024), "--disable-usage-stats"]


def _env() -> dict[str, str]:
    # no idle workers started ahead (Ray would start one per logical CPU: 64 processes on 2 cores)
    return {**ray_env(), "RAY_enable_worker_prestart": "0", "RAY_prestart_worker_first_driver": "0",
            "PYTHONPATH": str(REPO)}


def _ports(ports: dict[str, int]) -> list[str]:
    return [x for k, v in ports.items() for x in (k, str(v))]


@pytest.fixture()
def two_nodes():
    temp = node_temp_dir("mrc")
    head = node_ports(head=True)
    try:
        proc = subprocess.run([str(RAY), "start", "--head", "--temp-dir", str(temp), "--include-dashboard", "false",
                               *NODE, *_ports(head)], env=_env(), capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            pytest.skip(f"`ray start --head` failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-800:]}")
        address = f"127.0.0.1:{head['--port']}"
        proc = subprocess.run([str(RAY), "start", "--address", address, "--temp-dir", str(temp), *NODE,
                               *_ports(node_ports(head=False))], env=_env(), capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            pytest.skip(f"`ray start --address` (second node) failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-800:]}")
        yield address
    finally:
        stop_nodes(str(temp))
        shutil.rmtree(temp, ignore_errors=True)


def test_coco_job_places_on_two_simulated_nodes(two_nodes: str):
    cmd = [sys.executable, str(REPO / "benchmarks" / "cluster_check.py"), "--address", two_nodes, "--config",
           str(REPO / "jobs" / "coco.yaml"), "--set", "data.pseudo_labels=/unused", "--min-nodes", "2",
           "--pool-actors", "2"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=800, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    print(json.dumps(out, indent=1))  # the placement, for the log
    assert len(out["nodes"]) == 2 and all(n == {"CPU": 32.0, "GPU": 4.0} for n in out["nodes"])
    assert all(p["ok"] for p in out["plan"].values())
    groups = out["placement_groups"]
    assert set(groups) == {"features", "select", "debias", "train", "evaluate"}
    for stage, entry in groups.items():
        assert entry["ready"], stage
        for g in entry["groups"]:
            assert g["state"] == "CREATED" and len(g["nodes"]) == g["count"], (stage, g)
    feats = groups["features"]["groups"][0]
    assert feats["count"] == 56 and len(set(feats["nodes"])) == 2  # SPREAD over both nodes
    train = next(g for g in groups["train"]["groups"] if g["strategy"] == "PACK")
    assert train["count"] == 8 and sorted(train["nodes"].count(n) for n in set(train["nodes"])) == [4, 4]
    # real actors: each actor of the GPU pool that took a batch holds one GPU (Ray Data may hand every
    # batch to the first actor up); the train workers sit four per node on distinct GPUs
    gpu_pool = next(p for p in out["pool_probes"] if p["resources"].get("GPU", 0) >= 1)
    assert 1 <= gpu_pool["actors"] <= 2 and all(g != "" and "," not in g for g in gpu_pool["gpu_ids"])
    tp = out["train_probe"]
    assert tp["workers"] == 8 and sorted(tp["per_node"].values()) == [4, 4]
    assert all(len(set(g)) == 4 for g in tp["gpus_per_node"].values())
