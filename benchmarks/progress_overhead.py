"""Overhead of the progress counts (``stages.runtime``: one ``ProgressBoard.add.remote`` per batch).

Two figures: the caller's cost of one ping, measured inside a Ray actor (what a Ray Data actor
pays per batch), and a ``map_images`` pass with a do-nothing callable over ``--images`` ids with
the counter off and on (the pings are then all the work there is). At 80 000 images and batch 8
a pass sends 10 000 pings. Wall-clock numbers depend on the machine and its load, which is why
this is a benchmark and not a test.

    python benchmarks/progress_overhead.py [--images 4000] [--pings 5000] [--smoke-test]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mars_ray import console  # noqa: E402
from mars_ray.stages import runtime  # noqa: E402


@ray.remote(num_cpus=0)
class _Caller:
    def pings(self, board: object, n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            board.add.remote("bench", 8)  # type: ignore[attr-defined]
        return (time.perf_counter() - t) / n


class _Noop:
    def __call__(self, batch: dict) -> dict:
        return {"image_id": batch["image_id"]}


def _pass_seconds(n: int, counted: bool) -> float:
    if counted:
        console.setup(False, None)  # a listening console turns the counts on
    try:
        ids = [f"{i:06d}" for i in range(n)]
        t = time.perf_counter()
        ds = runtime.map_images(ids, _Noop, {}, batch_size=8)
        seen = sum(len(b["image_id"]) for b in ds.iter_batches(batch_size=1024))
        assert seen == n
        return time.perf_counter() - t
    finally:
        console.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--pings", type=int, default=5000)
    ap.add_argument("--smoke-test", action="store_true")
    args = ap.parse_args()
    if args.smoke_test:
        args.images, args.pings = 200, 200
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 2**20)
    board = runtime.ProgressBoard.remote()
    caller = _Caller.remote()
    ray.get(caller.pings.remote(board, 100))  # warm-up
    per_ping = ray.get(caller.pings.remote(board, args.pings))
    for counted in (False, True):  # warm-up
        _pass_seconds(200, counted)
    passes = {f"counted={c}": [round(_pass_seconds(args.images, c), 2) for _ in range(2)] for c in (False, True)}
    ray.shutdown()
    result = {"ping_us": round(per_ping * 1e6, 1), "pings_at_80k_images_batch_8_s": round(per_ping * 10_000, 2),
              "images": args.images, "pass_seconds": passes}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
