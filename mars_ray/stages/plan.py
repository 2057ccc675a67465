"""Cluster plan: the Ray resources each stage of a config asks for, and whether a cluster can place them.

``stage_requests(cfg)`` lists, for the stages ``mars run`` would run, every group of actors or
Train workers a stage starts, with the per-actor resources the stage passes to Ray (from the same
helpers, ``runtime.actor_resources`` / ``runtime.worker_resources``, so plan and stage cannot
disagree). ``place(requests, nodes)`` packs each stage's groups onto a cluster given as a list of
node resource dicts (stages run one after another, so each stage gets the whole cluster), the
way Ray would: Ray Train's workers ``PACK``, Ray Data's actor pools ``SPREAD``; it reports the
node of every actor and the CPUs left for Ray Data's read and write tasks. ``live_placement``
does the same on a running cluster with placement groups (``ray start`` on several machines, or
simulated nodes on one: ``tests/e2e/test_cluster_plan.py``).

Importing this module does not import Ray; ``mars plan`` prints the plan (``cli.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mars_ray import config as C

__all__ = ["Request", "StagePlacement", "actor_resources", "feature_gpus", "live_placement", "parse_cluster", "place",
           "stage_requests", "worker_resources"]


def actor_resources(cpus: float, gpus: float) -> dict[str, float]:
    """What one Ray Data actor of a stage asks for (``runtime.map_images`` passes exactly this)."""
    return {"CPU": float(cpus), "GPU": float(gpus)}


def worker_resources(cpus_per_worker: float, use_gpu: bool) -> dict[str, float]:
    """What one Ray Train worker asks for (``runtime.fit_torch`` passes exactly this)."""
    return {"CPU": float(cpus_per_worker), **({"GPU": 1.0} if use_gpu else {})}


@dataclass(frozen=True)
class Request:
    """``count`` actors (or Train workers) of one stage, each needing ``resources``."""

    stage: str
    what: str  # e.g. "Ray Data actor pool (ClusterImages)", "Ray Train workers"
    count: int
    resources: dict[str, float]
    strategy: str  # "PACK" (Ray Train's default) or "SPREAD" (Ray Data's default)

    def total(self) -> dict[str, float]:
        return {k: v * self.count for k, v in self.resources.items()}


def feature_gpus(cfg: C.Config, gpus: float) -> float:
    """GPUs of a features/debias actor (``gpus_per_actor``): none when F comes from files
    (``data.features_dir``): reading them needs no GPU, whatever the preset asks."""
    return 0.0 if cfg.data.features_dir else float(gpus)


def stage_requests(cfg: C.Config, stages: list[str] | None = None) -> list[Request]:
    """The resource requests of ``stages`` (default: what ``mars run`` plans for ``cfg``)."""
    from mars_ray import pipeline

    stages = stages or pipeline.plan_stages(cfg)
    out: list[Request] = []
    gpu = lambda use: 1.0 if use else 0.0  # noqa: E731 - one GPU per actor/worker when asked
    for s in stages:
        if s == "wsss":
            w = cfg.wsss
            out.append(Request(s, "Ray Train workers (CAM classifier)", w.num_workers,
                               worker_resources(w.cpus_per_worker, w.use_gpu), "PACK"))
            out.append(Request(s, "Ray Data actor pool (CAM pseudo labels)", w.num_actors,
                               actor_resources(w.cpus_per_actor, gpu(w.use_gpu)), "SPREAD"))
        elif s == "uss":
            u = cfg.uss
            out.append(Request(s, "Ray Train workers (USS)", u.num_workers,
                               worker_resources(u.cpus_per_worker, u.use_gpu), "PACK"))
        elif s == "features":
            f = cfg.features
            out.append(Request(s, "Ray Data actor pool (F + K-means)", f.num_actors,
                               actor_resources(f.cpus_per_actor, feature_gpus(cfg, f.gpus_per_actor)), "SPREAD"))
        elif s == "select":
            out.append(Request(s, "reduction actor (Eq 1-3)", 1, actor_resources(1.0, 0.0), "PACK"))
        elif s == "debias":
            d = cfg.debias
            out.append(Request(s, "Ray Data actor pool (F + Eq 4 + CRF)", d.num_actors,
                               actor_resources(d.cpus_per_actor, feature_gpus(cfg, d.gpus_per_actor)), "SPREAD"))
        elif s == "train":
            t = cfg.train
            out.append(Request(s, "Ray Train workers (MARS step)", t.num_workers,
                               worker_resources(t.cpus_per_worker, t.use_gpu), "PACK"))
            out.append(Request(s, "Ray Data actor pool (image + label rows)", 1, actor_resources(1.0, 0.0), "SPREAD"))
        elif s == "evaluate":
            e = cfg.evaluate
            out.append(Request(s, "Ray Data actor pool (prediction)", e.num_actors,
                               actor_resources(e.cpus_per_actor, gpu(e.use_gpu)), "SPREAD"))
    return out


def parse_cluster(text: str) -> list[dict[str, float]]:
    """``"2x32cpu4gpu"`` or ``"32cpu4gpu,16cpu"`` → one resource dict per node.

    Raises ValueError for anything else (naming the part it could not read).
    """
    import re

    nodes: list[dict[str, float]] = []
    for part in [p.strip().lower() for p in text.split(",") if p.strip()]:
        m = re.fullmatch(r"(?:(\d+)x)?(\d+(?:\.\d+)?)cpu(?:(\d+(?:\.\d+)?)gpu)?", part)
        if not m:
            raise ValueError(f"cluster {text!r}: cannot read {part!r} (write e.g. 2x32cpu4gpu or 16cpu)")
        n = int(m.group(1) or 1)
        node = {"CPU": float(m.group(2))}
        if m.group(3):
            node["GPU"] = float(m.group(3))
        nodes += [dict(node) for _ in range(n)]
    if not nodes:
        raise ValueError(f"cluster {text!r}: no nodes")
    return nodes


@dataclass
class StagePlacement:
    """Where one stage's requests land: ``nodes[i]`` is the node index of each actor, per request."""

    stage: str
    requests: list[Request]
    nodes: list[list[int]] = field(default_factory=list)
    spare: list[dict[str, float]] = field(default_factory=list)  # per node, what is left
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _fits(free: dict[str, float], need: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in need.items() if v)


def _take(free: dict[str, float], need: dict[str, float]) -> None:
    for k, v in need.items():
        free[k] = free.get(k, 0.0) - v


def place(requests: list[Request], cluster: list[dict[str, float]]) -> list[StagePlacement]:
    """Place each stage's requests on ``cluster`` (stages one at a time; all of a stage's actors at
    once). ``PACK`` fills the node with the most free resources first and stays there, as a Ray
    Train placement group does; ``SPREAD`` puts each next actor on the node with the most free
    CPUs. A stage whose actors do not all fit, or that leaves no CPU for Ray Data's tasks beside
    an actor pool, gets a problem naming the request and the shortfall."""
    by_stage: dict[str, list[Request]] = {}
    for r in requests:
        by_stage.setdefault(r.stage, []).append(r)
    out = []
    for stage, reqs in by_stage.items():
        free = [dict(n) for n in cluster]
        sp = StagePlacement(stage, reqs)
        # the largest per-actor requests first (GPU workers before CPU helpers)
        for r in sorted(reqs, key=lambda r: (-r.resources.get("GPU", 0.0), -r.resources.get("CPU", 0.0))):
            placed: list[int] = []
            for _ in range(r.count):
                candidates = [i for i, f in enumerate(free) if _fits(f, r.resources)]
                if not candidates:
                    break
                if r.strategy == "PACK" and placed and placed[-1] in candidates:
                    i = placed[-1]
                else:
                    i = max(candidates, key=lambda j: (free[j].get("GPU", 0.0) if r.strategy == "PACK" else 0.0,
                                                       free[j].get("CPU", 0.0), -j))
                _take(free[i], r.resources)
                placed.append(i)
            sp.nodes.append(placed)
            if len(placed) < r.count:
                total = {k: sum(n.get(k, 0.0) for n in cluster) for k in r.resources}
                sp.problems.append(
                    f"{stage}: {r.what} needs {r.count} x {r.resources}; only {len(placed)} fit "
                    f"(cluster: {total} in {len(cluster)} node(s))")
        sp.spare = free
        pools = [r for r in reqs if r.strategy == "SPREAD"]
        if pools and not sp.problems and sum(f.get("CPU", 0.0) for f in free) < 1.0:
            sp.problems.append(f"{stage}: the actors take every CPU; Ray Data's read/write tasks need at least "
                               f"one more (fewer actors or fewer CPUs per actor)")
        out.append(sp)
    return out


def describe(placements: list[StagePlacement]) -> str:
    """A readable table of the placements (``mars plan``)."""
    lines = []
    for sp in placements:
        for r, nodes in zip(sorted(sp.requests, key=lambda r: (-r.resources.get("GPU", 0.0),
                                                              -r.resources.get("CPU", 0.0))), sp.nodes):
            counts: dict[int, int] = {}
            for i in nodes:
                counts[i] = counts.get(i, 0) + 1
            where = ", ".join(f"node{i}: {c}" for i, c in sorted(counts.items())) or "-"
            lines.append(f"{sp.stage:<9} {r.count:>3} x {_fmt(r.resources):<18} {r.what:<42} {r.strategy:<6} {where}")
        spare_cpu = sum(f.get("CPU", 0.0) for f in sp.spare)
        lines.append(f"{'':<9} spare: {spare_cpu:g} CPU, {sum(f.get('GPU', 0.0) for f in sp.spare):g} GPU"
                     + ("".join(f"\n{'':<9} PROBLEM: {p}" for p in sp.problems)))
    return "\n".join(lines)


def _fmt(res: dict[str, float]) -> str:
    return " ".join(f"{v:g} {k}" for k, v in res.items() if v)


def live_placement(requests: list[Request], timeout_s: float = 60.0) -> dict[str, Any]:
    """On the connected Ray cluster: one placement group per request (its bundles and strategy),
    all of a stage's groups at once; returns per stage the node id of every bundle, or why the
    groups did not become ready within ``timeout_s``. Every group is removed again."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    node_names = {n["NodeID"]: n.get("NodeManagerAddress", "") + ":" + str(n.get("NodeManagerPort", ""))
                  for n in ray.nodes() if n.get("Alive")}
    out: dict[str, Any] = {}
    by_stage: dict[str, list[Request]] = {}
    for r in requests:
        by_stage.setdefault(r.stage, []).append(r)
    for stage, reqs in by_stage.items():
        groups = [placement_group([{k: v for k, v in r.resources.items() if v}] * r.count, strategy=r.strategy)
                  for r in reqs]
        try:
            ready, _ = ray.wait([g.ready() for g in groups], num_returns=len(groups), timeout=timeout_s)
            entry: dict[str, Any] = {"ready": len(ready) == len(groups), "groups": []}
            for r, g in zip(reqs, groups):
                table = placement_group_table(g)
                bundles = table.get("bundles_to_node_id", {})
                entry["groups"].append({"what": r.what, "count": r.count, "resources": r.resources,
                                        "strategy": r.strategy, "state": table.get("state"),
                                        "nodes": [node_names.get(bundles.get(i), bundles.get(i))
                                                  for i in range(r.count)]})
            out[stage] = entry
        finally:
            for g in groups:
                remove_placement_group(g)
    return out


def total_resources(requests: list[Request]) -> dict[str, dict[str, float]]:
    """Per stage, the sum of what its actors ask for."""
    out: dict[str, dict[str, float]] = {}
    for r in requests:
        acc = out.setdefault(r.stage, {})
        for k, v in r.total().items():
            acc[k] = acc.get(k, 0.0) + v
    return {s: {k: v for k, v in res.items() if not math.isclose(v, 0.0)} for s, res in out.items()}
