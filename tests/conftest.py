"""Shared fixtures: a tiny built-in biased dataset and one local Ray for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Object-store tests talk S3 to an in-process moto server. Its address and fake credentials go
# into the environment now, before any Ray starts, so Ray workers inherit them; the server itself
# starts only when a test asks for ``s3_bucket``.
S3_PORT = _free_port()
os.environ.update({
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
})


@pytest.fixture(autouse=True)
def _one_thread():
    """In-process torch runs tiny tensors here: intra-op threads oversubscribe the shared 2-core box
    (up to 20× slower), one thread is fastest. Ray workers set their own thread counts."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_tracking_uri_leak():
    """``mlflow.set_tracking_uri`` also sets ``$MLFLOW_TRACKING_URI``: keep one test's store out of the next."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on ``$AWS_ENDPOINT_URL`` for the session (skipped when moto is missing)."""
    import logging

    server_mod = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()


def new_bucket(prefix: str) -> str:
    """A new empty bucket on the test S3 server (``s3_server`` must be up): ``s3://<prefix>-<random>``."""
    import re
    import uuid

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", prefix.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def s3_bucket(s3_server, request: pytest.FixtureRequest) -> str:
    """A new empty bucket on the test S3 server for one test: ``s3://<name>``."""
    return new_bucket(request.node.name)


@pytest.fixture(scope="module")
def bucket(s3_server, request: pytest.FixtureRequest) -> str:
    """A new empty bucket shared by the tests of one module (named after it): ``s3://<name>``."""
    return new_bucket(request.module.__name__)


@pytest.fixture
def s3_requests(s3_server):
    """``with s3_requests() as got:`` collects every request the moto server handles in the block
    (``tests.s3_log``: ``got.count("PUT", where="?delete")``…)."""
    from tests.s3_log import collect

    return collect


def upload_tree(local: Path, uri: str) -> str:
    """Copy a local folder to an object-store URI (every file below it); returns ``uri``."""
    import pyarrow.fs as pafs

    from mars_ray.storage import upath

    dest = upath(uri)
    pafs.copy_files(str(Path(local).resolve()), dest.fs_path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=dest.fs)
    return uri


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


#: the settings of ``full_run``: every stage at test size, with the optional branches that read more
#: settings switched on (wsss.crf borrows debias.crf_*, debias.crf, evaluate.flip)
FULL_RUN = {
    "wsss.epochs": 2, "wsss.batch_size": 8, "wsss.crop_size": 48, "wsss.cam_scales": [1.0, 0.5], "wsss.crf": True,
    "uss.ssl_epochs": 1, "uss.epochs": 2, "uss.min_steps": 0, "uss.batch_size": 8, "uss.crop_size": 48, "uss.dim": 16,
    "debias.crf": True, "debias.crf_iters": 2,
    "train.epochs": 2, "train.batch_size": 4, "train.crop_size": 32, "train.crf_iters": 2, "train.checkpoint_every": 1,
    "evaluate.flip": True,
}
FULL_STAGES = ("wsss", "uss", "features", "select", "debias", "train", "evaluate")


@pytest.fixture(scope="session")
def full_run(tiny_data: Path, ray_local, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every stage (``FULL_STAGES``) once on ``tiny_data``, in-process, recording which settings each reads.

    Returns ``{"run": RUN, "config": the YAML the CLI gets, "reads": {stage: {"section.key", …}}}``.
    Read-only for tests (``copy_run`` for a private copy). Used by the stage-key test and the
    fault-injection matrix (its clean reference).
    """
    from mars_ray import config as C
    from mars_ray import pipeline

    from tests.stage_reads import recorded_reads

    base = tmp_path_factory.mktemp("full_run")
    config = base / "full.yaml"
    cfg = C.build(overrides={"data.root": str(tiny_data), "data.pseudo_labels": str(tiny_data / "pseudo_labels"),
                             **FULL_RUN})
    C.dump_yaml(cfg, config)
    run = base / "run"
    reads = {}
    for stage in FULL_STAGES:
        with recorded_reads() as r:
            pipeline.run_stage(cfg, run, stage)
        reads[stage] = set(r)
    return {"run": run, "config": config, "reads": reads}
