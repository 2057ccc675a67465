"""Connecting to Ray: a local instance on a laptop/CI, or the cluster under ``ray job submit``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import ray

from mars_ray.config import RayConfig
from mars_ray.storage import ObjectPath, ray_storage

logger = logging.getLogger(__name__)

_started_here = False


def ensure_ray(cfg: RayConfig) -> None:
    """``ray.init`` once per process with the configured address/resources.

    Locally (``address`` empty) Ray starts in-process without dashboard; token auth and usage
    stats are switched off unless the environment says otherwise (RAY_NOTES.md). Under
    ``ray job submit`` the job's driver joins the cluster (``RAY_ADDRESS`` is set by Ray).
    """
    global _started_here
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {"address": address, "log_to_driver": True}
    if address is None:
        kwargs["include_dashboard"] = False
        if cfg.num_cpus:
            kwargs["num_cpus"] = cfg.num_cpus
        if cfg.object_store_mb:
            kwargs["object_store_memory"] = cfg.object_store_mb * 1024 * 1024
    logger.info("ray.init(%s)", {k: v for k, v in kwargs.items() if v is not None})
    ray.init(**kwargs)
    _started_here = True


def shutdown_if_started() -> None:
    """Stop Ray only when ``ensure_ray`` started it (a caller's own session is left alone)."""
    global _started_here
    if _started_here and ray.is_initialized():
        ray.shutdown()
    _started_here = False


def fit_torch(
    train_fn: Callable[[dict], None],
    loop_config: dict[str, Any],
    *,
    name: str,
    storage: "str | Path | ObjectPath",
    num_workers: int,
    use_gpu: bool,
    cpus_per_worker: float,
    max_failures: int,
    datasets: dict[str, Any] | None = None,
    keep_checkpoints: int = 2,
) -> "ray.train.Result":
    """Run ``train_fn`` on a ``TorchTrainer`` (DDP over ``num_workers``; GPU when ``use_gpu``).

    Resuming is Ray Train V2's: the same ``name`` under the same ``storage`` path continues from
    the last reported checkpoint (``ray.train.get_checkpoint()`` inside ``train_fn``), and
    ``FailureConfig(max_failures)`` restarts failed workers from it. ``storage`` is a local folder
    (made absolute: Train changes the working directory of its workers) or an object-store URI
    (``mars_ray.storage.ray_storage``). Only the newest ``keep_checkpoints`` checkpoints are kept.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    storage_path, storage_filesystem = ray_storage(storage)
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
        ),
        datasets=datasets,
    )
    return trainer.fit()


def map_images(
    ids: list[str],
    fn: type,
    fn_kwargs: dict[str, Any],
    *,
    num_actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0,
    batch_size: int = 8,
) -> "ray.data.Dataset":
    """Shard image ids over an actor pool: ``fn(**fn_kwargs)`` once per actor, then one call a batch.

    Rows in are ``{"image_id": str}``; ``fn.__call__(batch: dict[str, np.ndarray])`` returns what
    the stage needs. Enough blocks (≥ 4 per actor, ≤ 64 ids each) that the pool stays busy.
    """
    n_blocks = max(1, min(len(ids), max(4 * num_actors, len(ids) // 64)))
    ds = ray.data.from_items([{"image_id": i} for i in ids], override_num_blocks=n_blocks)
    return ds.map_batches(
        fn,
        fn_constructor_kwargs=fn_kwargs,
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
        batch_size=batch_size,
        batch_format="numpy",
    )


STATE_FILE = "state.pt"


def report_epoch(metrics: dict[str, Any], state: dict[str, Any] | None = None) -> None:
    """In a Ray Train worker: report an epoch's numeric metrics, with ``state`` as the checkpoint.

    Rank 0 passes the training state (weights, optimiser, counters, history) when a checkpoint is
    due; the other ranks and off-epochs pass ``None``.
    """
    import tempfile

    import ray.train
    import torch

    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, Path(d) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def restored_state(*, map_location: Any = "cpu", weights_only: bool = True) -> dict[str, Any] | None:
    """In a Ray Train worker: the state of the last reported checkpoint of this run, or ``None``."""
    import ray.train
    import torch

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location=map_location, weights_only=weights_only)
