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


@pytest.fixture(scope="session")
def debiased_run(tiny_data: Path, ray_local, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``features → select → debias`` on ``tiny_data`` (no CRF), computed once for the session.

    Read-only for tests: a module that writes into a run takes its own copy (``copy_run``).
    """
    from mars_ray import config as C
    from mars_ray.stages import debias, features, select

    run_dir = tmp_path_factory.mktemp("debiased_run")
    cfg = C.build(overrides={"data.root": str(tiny_data), "data.pseudo_labels": str(tiny_data / "pseudo_labels"),
                             "debias.crf": False})
    for stage in (features, select, debias):
        stage.run(cfg, run_dir)
    return run_dir


def copy_run(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of a finished run folder (stage manifests and artifacts included)."""
    import shutil

    return Path(shutil.copytree(run_dir, tmp_path_factory.mktemp("run") / "run"))
