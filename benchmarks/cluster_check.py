"""Placement check of a config's stages on a running Ray cluster (placement, not speed).

1. the dry-run plan (``stages/plan.py``) against the cluster's own node resources;
2. one placement group per stage request, as Ray Train (``PACK``) and Ray Data (``SPREAD``) would
   ask, with the node of every bundle (``plan.live_placement``);
3. real actors: a Ray Data actor pool (``runtime.map_images``) with a stage's per-actor resources,
   whose actors report their node and GPU ids, and Ray Train workers with the train stage's
   per-worker resources (``plan.worker_resources``, gloo backend: no CUDA is touched, so logical
   GPUs of a simulated cluster do), which report theirs.

Prints one JSON object; exit status 1 when a stage does not fit. ``tests/e2e/test_cluster_plan.py``
runs it on two simulated nodes (``ray start --num-cpus 32 --num-gpus 4`` twice on one machine)::

    python benchmarks/cluster_check.py --address HEAD:6379 --config jobs/coco.yaml --set data.pseudo_labels=/x
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from typing import Any

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import ray  # noqa: E402

from mars_ray import config as C  # noqa: E402
from mars_ray.stages import plan  # noqa: E402
from mars_ray.stages.runtime import map_images  # noqa: E402


class _Where:
    """Ray Data callable: each batch's rows get the actor's node id and GPU ids."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(0.5)  # slow enough that the pool's later actors get batches too
        ctx = ray.get_runtime_context()
        gpus = ",".join(str(g) for g in ray.get_gpu_ids())
        n = len(batch["image_id"])
        return {"node": np.array([ctx.get_node_id()] * n), "gpus": np.array([gpus] * n),
                "pid": np.array([os.getpid()] * n)}


@ray.remote(num_cpus=0)
class _Collector:
    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def add(self, info: dict[str, Any]) -> None:
        self.seen.append(info)

    def get(self) -> list[dict[str, Any]]:
        return self.seen


def _train_probe(config: dict[str, Any]) -> None:
    import ray.train

    ctx = ray.train.get_context()
    ray.get(ray.get_actor(config["collector"]).add.remote({
        "rank": ctx.get_world_rank(), "node": ray.get_runtime_context().get_node_id(),
        "gpus": [str(g) for g in ray.get_gpu_ids()], "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}))
    ray.train.report({"rank": ctx.get_world_rank()})


def pool_probe(req: plan.Request, actors: int) -> dict[str, Any]:
    """``actors`` actors of a stage's Ray Data pool with its per-actor resources: node and GPUs of each."""
    ds = map_images([f"probe{i}" for i in range(8 * actors)], _Where, {}, num_actors=actors,
                    cpus_per_actor=req.resources.get("CPU", 1.0), gpus_per_actor=req.resources.get("GPU", 0.0),
                    batch_size=4)
    per_pid: dict[int, tuple[str, str]] = {}
    for b in ds.iter_batches(batch_size=None):
        for node, gpus, pid in zip(b["node"], b["gpus"], b["pid"]):
            per_pid[int(pid)] = (str(node), str(gpus))
    return {"stage": req.stage, "what": req.what, "actors": len(per_pid), "resources": req.resources,
            "per_node": dict(Counter(n for n, _ in per_pid.values())),
            "gpu_ids": sorted(g for _, g in per_pid.values())}


def train_probe(req: plan.Request, workers: int) -> dict[str, Any]:
    """``workers`` Ray Train workers with the train stage's per-worker resources: node and GPUs of each."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    name = f"mars-probe-{os.getpid()}"
    collector = _Collector.options(name=name).remote()
    use_gpu = req.resources.get("GPU", 0.0) > 0
    with tempfile.TemporaryDirectory() as storage:
        TorchTrainer(_train_probe, train_loop_config={"collector": name},
                     scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                                  resources_per_worker=plan.worker_resources(req.resources["CPU"], use_gpu)),
                     torch_config=TorchConfig(backend="gloo"),
                     run_config=RunConfig(name=name, storage_path=storage)).fit()
    seen = ray.get(collector.get.remote())
    ray.kill(collector)
    return {"stage": req.stage, "workers": len(seen), "resources": req.resources,
            "per_node": dict(Counter(s["node"] for s in seen)),
            "gpus_per_node": {n: sorted(g for s in seen if s["node"] == n for g in s["gpus"]) for n in {s["node"] for s in seen}}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--address", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE")
    ap.add_argument("--pool-actors", type=int, default=4, help="real actors started per probed actor pool")
    ap.add_argument("--train-workers", type=int, default=0, help="real Train workers (0: as many as the config)")
    ap.add_argument("--min-nodes", type=int, default=1, help="wait (up to 120 s) until this many nodes are alive")
    args = ap.parse_args(argv)
    cfg = C.build(args.config, C.parse_set(args.set))
    ray.init(address=args.address, log_to_driver=False)
    deadline = time.time() + 120
    while len([n for n in ray.nodes() if n.get("Alive")]) < args.min_nodes and time.time() < deadline:
        time.sleep(1)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cluster = [{k: float(v) for k, v in n["Resources"].items() if k in ("CPU", "GPU")} for n in nodes]
    requests = plan.stage_requests(cfg)
    placements = plan.place(requests, cluster)
    out: dict[str, Any] = {"nodes": cluster, "plan": {p.stage: {"ok": p.ok, "problems": p.problems,
                                                               "nodes": p.nodes} for p in placements}}
    print(plan.describe(placements), file=sys.stderr)
    out["placement_groups"] = plan.live_placement(requests)
    pools = [r for r in requests if r.strategy == "SPREAD"]
    gpu_pool = next((r for r in pools if r.resources.get("GPU", 0.0) >= 1.0), None)
    cpu_pool = next((r for r in pools if r.stage == "features"), None)
    out["pool_probes"] = [pool_probe(r, min(args.pool_actors, r.count)) for r in (cpu_pool, gpu_pool) if r]
    train = next((r for r in requests if r.stage == "train" and r.strategy == "PACK"), None)
    if train:
        out["train_probe"] = train_probe(train, args.train_workers or train.count)
    print(json.dumps(out, indent=1))
    ok = all(p.ok for p in placements) and all(e["ready"] for e in out["placement_groups"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
