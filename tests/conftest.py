"""Shared fixtures: a tiny built-in biased dataset and one local Ray for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in biased dataset at test size (train 16, val 6, 48 px)."""
    from mars_ray.data.synthetic import make_biased_dataset

    return make_biased_dataset(tmp_path_factory.mktemp("tiny") / "data", n_train=16, n_val=6, size=48, seed=3)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray for the session (2 logical CPUs, capped object store); stopped at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=256 * 1024 * 1024, include_dashboard=False,
                 log_to_driver=False)
    yield ray
    ray.shutdown()
