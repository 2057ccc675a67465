"""MLflow helpers: tracking-URI resolution and probing, experiments, artifacts of a finished run.

MLflow is imported lazily (only when a function here is called), and nothing here imports Ray.
Every function that writes is meant for one process: the Tune driver, or rank 0 of a training
job (pass ``rank``; other ranks return at once). SQLite stores dislike concurrent writers, which is
why a sweep logs params/metrics through one ``MLflowLoggerCallback`` on the Tune driver and the
artifacts from the same driver after the sweep.

Default store: ``sqlite:///<absolute RUN>/mlflow.db`` with artifacts in ``RUN/mlartifacts`` (an
absolute path, because Tune changes the working directory of its trials).
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

DB_NAME = "mlflow.db"
ARTIFACTS = "mlartifacts"


def resolve_tracking_uri(run_dir: str | Path, explicit: str | None = None) -> str:
    """``explicit`` (``--tracking-uri``) > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<abs RUN>/mlflow.db``."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    return f"sqlite:///{(Path(run_dir) / DB_NAME).resolve()}"


def default_artifact_location(uri: str, run_dir: str | Path) -> str | None:
    """``RUN/mlartifacts`` for local stores (sqlite / plain paths); ``None`` lets a server decide."""
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    return (Path(run_dir) / ARTIFACTS).resolve().as_uri()


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


def log_artifacts(uri: str, run_id: str, files: Sequence[str | Path], *, artifact_path: str | None = None,
                  rank: int = 0) -> int:
    """Attach existing ``files`` to a run; returns how many were logged (rank 0 only)."""
    if rank != 0:
        return 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    n = 0
    for f in files:
        if Path(f).is_file():
            client.log_artifact(run_id, str(f), artifact_path=artifact_path)
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


def label_montage(rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: str | Path,
                  *, scale: int = 2) -> Path:
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
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    Image.fromarray(np.concatenate(tiles, axis=0)).save(tmp, format="PNG")
    os.replace(tmp, out)
    return out


__all__ = [
    "resolve_tracking_uri",
    "default_artifact_location",
    "probe",
    "ensure_experiment",
    "run_ids_by_name",
    "log_artifacts",
    "log_metrics",
    "label_montage",
]
