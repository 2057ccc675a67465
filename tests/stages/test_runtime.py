"""``stages.runtime``: the Ray Train plumbing every training stage shares (no Ray started here)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from mars_ray.stages import runtime


@pytest.mark.parametrize("stream", sorted(runtime._SEED_STREAMS))
def test_worker_seeds_are_distinct_within_a_run_and_repeat_across_runs(stream: str):
    a, b, c = runtime._SEED_STREAMS[stream]
    epochs = range(50) if b else range(1)  # streams without an epoch term are drawn once per worker
    seeds = [runtime.worker_seed(7, rank, epoch, stream=stream) for rank, epoch in itertools.product(range(8), epochs)]
    assert len(set(seeds)) == len(seeds)
    assert seeds == [runtime.worker_seed(7, r, e, stream=stream) for r, e in itertools.product(range(8), epochs)]
    assert runtime.worker_seed(8, 0, 0, stream=stream) != runtime.worker_seed(7, 0, 0, stream=stream)


def test_final_state_reads_the_last_checkpoint_and_names_a_run_without_one(tmp_path: Path):
    import ray.train

    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"epoch": 3, "w": torch.ones(2)}, folder / runtime.STATE_FILE)
    done = ray.train.Result(metrics={}, checkpoint=ray.train.Checkpoint.from_directory(str(folder)), error=None,
                            path=str(tmp_path))
    state = runtime.final_state(done, tmp_path / "ray")
    assert state["epoch"] == 3 and torch.equal(state["w"], torch.ones(2))
    empty = ray.train.Result(metrics={}, checkpoint=None, error=None, path=str(tmp_path))
    with pytest.raises(RuntimeError, match=r"ray: the Ray Train run reported no checkpoint"):
        runtime.final_state(empty, tmp_path / "ray")
