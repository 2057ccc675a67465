"""Peak memory and CPU time of a process tree (the driver, Ray's own processes, every Ray worker).

``TreeSampler`` samples with psutil every ``interval`` seconds in a background thread: for each
process of the tree under ``root`` (by default this process; a local ``ray.init`` starts raylet,
GCS and the workers below it) its RSS, its private RSS (RSS minus shared pages: Ray's object store
is a shared mapping, so an actor that reads a block shows it in RSS but not in private RSS), its
command line (Ray names workers ``ray::<actor or task>``) and its CPU seconds. Used by
``scale_bench.py``; psutil comes with Ray (vendored).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

try:
    import psutil
except ImportError:  # Ray vendors psutil (ray/thirdparty_files) and puts it on sys.path when imported
    import ray  # noqa: F401
    import psutil

MB = 1024 * 1024
_SYSTEM = ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env", "monitor.py", "agent")


@dataclass
class _Seen:
    title: str
    kind: str  # driver | worker | ray_system | other
    peak_rss: int = 0
    peak_private: int = 0
    cpu_first: float = 0.0
    cpu_last: float = 0.0
    titles: set[str] = field(default_factory=set)


def _kind(pid: int, root: int, cmd: str) -> str:
    if pid == root:
        return "driver"
    if "ray::" in cmd or "default_worker.py" in cmd:
        return "worker"
    if any(s in cmd for s in _SYSTEM) or "ray/" in cmd:
        return "ray_system"
    return "other"


class TreeSampler:
    """``with TreeSampler() as s: ...`` then ``s.summary()`` (see the module docstring)."""

    def __init__(self, root: int | None = None, interval: float = 0.2) -> None:
        self.root = root or os.getpid()
        self.interval = interval
        self.seen: dict[int, _Seen] = {}
        self.peak_total_rss = 0
        self.peak_total_private = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="TreeSampler", daemon=True)
        self.t0 = self.t1 = 0.0

    def __enter__(self) -> "TreeSampler":
        self.t0 = time.perf_counter()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.t1 = time.perf_counter()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        try:
            root = psutil.Process(self.root)
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            return
        total = private = 0
        for p in procs:
            try:
                with p.oneshot():
                    mem = p.memory_info()
                    cpu = p.cpu_times()
                    cmd = " ".join(p.cmdline()) or p.name()
            except psutil.Error:
                continue
            busy = cpu.user + cpu.system
            s = self.seen.get(p.pid)
            if s is None:
                s = self.seen[p.pid] = _Seen(cmd[:120], _kind(p.pid, self.root, cmd), cpu_first=busy)
            s.titles.add(cmd[:120])
            s.title = cmd[:120]
            s.peak_rss = max(s.peak_rss, mem.rss)
            s.peak_private = max(s.peak_private, mem.rss - getattr(mem, "shared", 0))
            s.cpu_last = busy
            total += mem.rss
            private += mem.rss - getattr(mem, "shared", 0)
        self.peak_total_rss = max(self.peak_total_rss, total)
        self.peak_total_private = max(self.peak_total_private, private)
        self.samples += 1

    def summary(self) -> dict[str, Any]:
        """Peaks in MB and CPU seconds spent during the window, by kind; every worker listed."""
        workers = []
        out: dict[str, Any] = {"seconds": self.t1 - self.t0, "samples": self.samples,
                               "peak_total_rss_mb": self.peak_total_rss / MB,
                               "peak_total_private_mb": self.peak_total_private / MB}
        cpu: dict[str, float] = {"driver": 0.0, "worker": 0.0, "ray_system": 0.0, "other": 0.0}
        for pid, s in sorted(self.seen.items()):
            cpu[s.kind] += s.cpu_last - s.cpu_first
            if s.kind == "driver":
                out["driver"] = {"peak_rss_mb": s.peak_rss / MB, "peak_private_mb": s.peak_private / MB}
            elif s.kind == "worker":
                named = sorted(t for t in s.titles if "IDLE" not in t) or sorted(s.titles)
                workers.append({"pid": pid, "title": named[-1][:80], "peak_rss_mb": s.peak_rss / MB,
                                "peak_private_mb": s.peak_private / MB, "cpu_s": s.cpu_last - s.cpu_first})
        busy = [w for w in workers if w["cpu_s"] > 0.5 or "IDLE" not in w["title"]]
        out["workers"] = busy
        out["max_worker_peak_rss_mb"] = max((w["peak_rss_mb"] for w in busy), default=0.0)
        out["max_worker_peak_private_mb"] = max((w["peak_private_mb"] for w in busy), default=0.0)
        out["cpu_s"] = cpu
        return out


def peak_of(summary: dict[str, Any], title_part: str) -> dict[str, float]:
    """Peak RSS / private RSS (MB) over the workers whose title contains ``title_part``."""
    ws = [w for w in summary.get("workers", []) if title_part in w["title"]]
    return {"peak_rss_mb": max((w["peak_rss_mb"] for w in ws), default=0.0),
            "peak_private_mb": max((w["peak_private_mb"] for w in ws), default=0.0)}
