"""MLflow helpers: tracking-URI resolution and probing, experiments, artifacts of a finished run.

MLflow is imported lazily (only when a function here is called), and nothing here imports Ray.
Every function that writes is meant for one process: the Tune driver, or rank 0 of a training
job (pass ``rank``; other ranks return at once). SQLite stores dislike concurrent writers, which is
why a sweep logs params/metrics through one ``MLflowLoggerCallback`` on the Tune driver and the
artifacts from the same driver after the sweep.

Default store: ``sqlite:///<absolute RUN>/mlflow.db`` with artifacts in ``RUN/mlartifacts`` (an
absolute path, because Tune changes the working directory of its trials).

A run folder on an object store (``RUN`` = ``s3://bucket/run``, see ``mars_ray.storage``) cannot hold
a SQLite file: there the tracking URI must be given (``--tracking-uri`` or ``$MLFLOW_TRACKING_URI``:
an MLflow server, or ``sqlite:////local/path/mlflow.db``), and the artifacts go to the URI
``RUN/mlartifacts``, which MLflow writes with the store's client library (``boto3`` for ``s3://``).
Both are checked before a sweep starts (``resolve_tracking_uri``, ``check_artifact_location``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from mars_ray import storage
from mars_ray.storage import AnyPath

logger = logging.getLogger(__name__)

DB_NAME = "mlflow.db"
ARTIFACTS = "mlartifacts"


def resolve_tracking_uri(run_dir: AnyPath, explicit: str | None = None) -> str:
    """``explicit`` (``--tracking-uri``) > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<abs RUN>/mlflow.db``.

    The SQLite default needs a local ``RUN``: for an object-store ``RUN`` without an explicit URI this
    raises ``ValueError`` saying what to pass instead.
    """
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    if storage.is_uri(run_dir):
        raise ValueError(
            f"--out {run_dir} is on an object store, where the default MLflow store (a SQLite file "
            f"RUN/{DB_NAME}) cannot live: pass --tracking-uri (or set MLFLOW_TRACKING_URI) to an MLflow "
            f"server, e.g. http://MLFLOW:5000, or to a SQLite file on a local disk, e.g. "
            f"sqlite:////local/path/{DB_NAME} (artifacts still go to {run_dir / ARTIFACTS})"
        )
    return f"sqlite:///{(run_dir / DB_NAME).resolve()}"


@contextlib.contextmanager
def isolated_tracking_uri() -> Iterator[None]:
    """Undo on exit what ``mlflow.set_tracking_uri`` (called by Tune's MLflow callback) leaves behind.

    MLflow keeps the last URI in a module global and in ``$MLFLOW_TRACKING_URI``; without this a
    second sweep in the same process (a notebook, a test session) would log into the first one's store.
    """
    from mlflow.tracking._tracking_service import utils as mlflow_utils

    env = os.environ.get("MLFLOW_TRACKING_URI")
    global_uri = getattr(mlflow_utils, "_tracking_uri", None)
    try:
        yield
    finally:
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env
        if hasattr(mlflow_utils, "_tracking_uri"):
            mlflow_utils._tracking_uri = global_uri


def default_artifact_location(uri: str, run_dir: AnyPath) -> str | None:
    """Where a new experiment keeps its artifacts: ``RUN/mlartifacts``, or ``None`` to let a server decide.

    Local ``RUN``: a ``file://`` URI for local stores (sqlite / plain paths), ``None`` for servers.
    Object-store ``RUN``: the URI ``RUN/mlartifacts`` whatever the store (not on Databricks, which
    decides itself), so a run's artifacts stay with the run.
    """
    if uri.startswith("databricks"):
        return None
    if storage.is_uri(run_dir):
        return str(run_dir / ARTIFACTS)
    if uri.startswith(("http://", "https://")):
        return None
    return (run_dir / ARTIFACTS).resolve().as_uri()


# URI scheme → (module MLflow needs to write artifacts there, pip package that provides it)
ARTIFACT_CLIENTS: dict[str, tuple[str, str]] = {
    "s3": ("boto3", "boto3"),
    "r2": ("boto3", "boto3"),
    "b2": ("boto3", "boto3"),
    "gs": ("google.cloud.storage", "google-cloud-storage"),
    "wasbs": ("azure.storage.blob", "azure-storage-blob"),
    "abfss": ("azure.storage.filedatalake", "azure-storage-file-datalake"),
    "hdfs": ("pyarrow", "pyarrow"),
    "viewfs": ("pyarrow", "pyarrow"),
}
_MLFLOW_OWN_SCHEMES = ("file", "mlflow-artifacts", "http", "https", "dbfs", "runs", "models", "ftp", "sftp")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package, or a module set to None
        return False


def check_artifact_location(location: str | None) -> None:
    """``ValueError`` when MLflow cannot write artifacts to ``location`` from this process.

    MLflow writes object-store artifacts itself, with the store's own client library: ``boto3``
    for ``s3://``, ``google-cloud-storage`` for ``gs://``…; a scheme MLflow has no artifact
    repository for (e.g. an fsspec-only ``memory://``) is refused too. ``None``, local paths and
    ``file://`` pass.
    """
    if not location or "://" not in location:
        return
    scheme = location.split("://", 1)[0].lower()
    if scheme in _MLFLOW_OWN_SCHEMES:
        return
    if scheme not in ARTIFACT_CLIENTS:  # perhaps an artifact-repository plugin: ask MLflow
        try:
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            get_artifact_repository(location)
        except Exception as e:  # noqa: BLE001 - MlflowException for an unknown scheme, or a plugin's error
            raise ValueError(
                f"MLflow artifact location {location}: MLflow cannot store artifacts on {scheme}:// "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); put the run folder on a "
                "store MLflow supports (s3://, gs://, hdfs://, …) or on a shared filesystem"
            ) from None
        return
    module, package = ARTIFACT_CLIENTS[scheme]
    if not _importable(module):
        raise ValueError(
            f"MLflow artifact location {location}: MLflow writes {scheme}:// artifacts with {package}, "
            f"which is not installed: pip install {package} (also in jobs/runtime_env.yaml on a cluster)"
        )


def experiment_artifact_location(uri: str, name: str, default: str | None) -> str | None:
    """The artifact location experiment ``name`` has (when it exists already) or will get (``default``)."""
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
    return exp.artifact_location if exp is not None else default


@contextlib.contextmanager
def _no_retries() -> Iterator[None]:
    """Fail fast while probing: MLflow otherwise retries an unreachable server for minutes."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def probe(uri: str, *, timeout: float = 5.0) -> None:
    """Check that the tracking store answers; ``ValueError`` naming the URI and the cause otherwise.

    HTTP servers are first reached with a plain request (any HTTP status counts as reachable), so a
    dead address fails in seconds; then MLflow itself lists one experiment (this also creates the
    tables of a new SQLite store).
    """
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout)  # noqa: S310 - user's URI
        except urllib.error.HTTPError:
            pass  # the server answered
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ValueError(f"MLflow tracking URI {uri} is unreachable: {reason}") from None
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.parent.is_dir():
            raise ValueError(f"MLflow tracking URI {uri}: folder {db.parent} does not exist")
    try:
        from mlflow.tracking import MlflowClient

        with _no_retries():
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - any failure here means: this store cannot be used
        raise ValueError(f"MLflow tracking URI {uri} cannot be used: {type(e).__name__}: {e}") from None


def ensure_experiment(uri: str, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name`` (created with ``artifact_location`` when new)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def run_ids_by_name(uri: str, experiment: str) -> dict[str, str]:
    """``{run name: run id}`` of an experiment (the newest run wins for a repeated name)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], max_results=50000, order_by=["attributes.start_time ASC"])
    return {r.info.run_name: r.info.run_id for r in runs}


def log_artifacts(uri: str, run_id: str, files: Sequence[AnyPath], *,
                  artifact_path: str | None = None, rank: int = 0) -> int:
    """Attach existing ``files`` to a run; returns how many were logged (rank 0 only).

    Files may be local or on an object store: MLflow uploads local files only, so an object-store
    file is first copied into a temporary folder under its own name (missing files are skipped).
    """
    if rank != 0:
        return 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    n = 0
    for p in files:
        if not p.is_file():
            continue
        if not storage.is_uri(p):
            client.log_artifact(run_id, str(p), artifact_path=artifact_path)
        else:
            with tempfile.TemporaryDirectory(prefix="mars-artifact-") as tmp:
                local = Path(tmp) / p.name
                local.write_bytes(p.read_bytes())
                client.log_artifact(run_id, str(local), artifact_path=artifact_path)
        n += 1
    return n


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, Any], *, step: int = 0, rank: int = 0) -> None:
    """Log the finite numeric entries of ``metrics`` to an existing run (rank 0 only)."""
    if rank != 0:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
            client.log_metric(run_id, k, float(v), step=step)


def label_montage(rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
                  path: AnyPath, *, scale: int = 2) -> AnyPath:
    """A PNG grid, one row per image: image | pseudo label Y^b | debiased label Y^db.

    ``rows``: ``(image_id, image [H, W, 3] uint8, Y^b [H, W] uint8, Y^db [H, W] uint8)``; labels are
    drawn with the VOC palette (``data.label_io.VOC_PALETTE``: BIASED 254 in magenta).
    """
    from PIL import Image, ImageDraw

    from mars_ray.data.label_io import VOC_PALETTE

    def colour(label: np.ndarray) -> np.ndarray:
        return VOC_PALETTE[label]

    tiles = []
    for image_id, image, pseudo, debiased in rows:
        strip = np.concatenate([image[..., :3], colour(pseudo), colour(debiased)], axis=1)
        strip = np.kron(strip, np.ones((scale, scale, 1), np.uint8)) if scale > 1 else strip
        header = Image.new("RGB", (strip.shape[1], 14), "black")
        ImageDraw.Draw(header).text((2, 1), f"{image_id}: image | Y^b | Y^db (magenta = biased)", fill="white")
        tiles.append(np.concatenate([np.asarray(header), strip], axis=0))
    width = max(t.shape[1] for t in tiles)
    tiles = [np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0))) for t in tiles]
    from mars_ray.artifacts import atomic_write_bytes

    buf = io.BytesIO()
    Image.fromarray(np.concatenate(tiles, axis=0)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())  # local: temporary name + rename; object store: one upload
    return path


__all__ = [
    "resolve_tracking_uri",
    "default_artifact_location",
    "check_artifact_location",
    "experiment_artifact_location",
    "probe",
    "ensure_experiment",
    "run_ids_by_name",
    "log_artifacts",
    "log_metrics",
    "label_montage",
]
