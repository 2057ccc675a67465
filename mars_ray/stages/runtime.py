"""Ray plumbing every stage shares: connecting, Ray Data actor pools, Ray Train runs and their state.

* ``ensure_ray``: a local instance on a laptop/CI, or the cluster under ``ray job submit``;
* ``map_images``: a stage's Ray Data actor pool over image ids;
* ``fit_torch`` → (workers: ``restored_state``, ``report_epoch``) → ``final_state``: one Ray Train
  run, resumable, whose last checkpoint holds the whole training state (``state.pt``);
* ``worker_seed``: every seed a Train worker derives from the run's seed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import ray

from mars_ray.config import RayConfig
from mars_ray.stages.plan import actor_resources, worker_resources
from mars_ray.storage import AnyPath, ray_storage

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
    storage: AnyPath,
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
    resources = worker_resources(cpus_per_worker, use_gpu)
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
    the stage needs. Enough blocks (≥ 4 per actor, ≤ 64 ids each) that the pool stays busy. Only
    the ids pass through the driver (a row dict each while the blocks are built, ~200 bytes an id:
    ~1.7 GB for Open Images' 9M; ``from_arrow`` would be 10x smaller but starts a remote task per
    block: extra worker processes, which on a loaded 2-core machine died in Ray's metrics thread).
    """
    n_blocks = max(1, min(len(ids), max(4 * num_actors, len(ids) // 64)))
    ds = ray.data.from_items([{"image_id": i} for i in ids], override_num_blocks=n_blocks)
    res = actor_resources(cpus_per_actor, gpus_per_actor)
    return ds.map_batches(
        fn,
        fn_constructor_kwargs=fn_kwargs,
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=res["CPU"],
        num_gpus=res["GPU"],
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


def final_state(result: "ray.train.Result", where: AnyPath, *, weights_only: bool = True) -> dict[str, Any]:
    """On the driver, after ``fit_torch``: the training state of the run's last checkpoint (CPU tensors).

    ``where`` names the run in the ``RuntimeError`` raised when it reported no checkpoint (a Ray
    failure, not user input). ``weights_only=False`` for states holding optimiser/scaler objects.
    """
    import torch

    if result.checkpoint is None:
        raise RuntimeError(f"{where}: the Ray Train run reported no checkpoint")
    with result.checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=weights_only)


#: (multiplier of the run's seed, of the epoch, of the rank) for each random stream of a Train worker
_SEED_STREAMS: dict[str, tuple[int, int, int]] = {
    "init": (1, 0, 1),  # torch.manual_seed: per rank (DDP broadcasts rank 0's weights anyway)
    "crops": (1, 0, 1000),  # a worker's crop generator (its rng runs on across epochs)
    "knn_crops": (1, 0, 2000),  # the USS head phase's crop generator (pairs with k-NN neighbours)
    "augment": (100003, 101, 1),  # SegAugment of one epoch
    "shuffle": (7919, 31, 1),  # Ray Data's local shuffle of one epoch
}


def worker_seed(base: int, rank: int, epoch: int = 0, *, stream: str) -> int:
    """The seed of one random stream of Train worker ``rank`` in ``epoch``, from the run's seed ``base``.

    ``base·a + epoch·b + rank·c`` with ``(a, b, c)`` per stream (``_SEED_STREAMS``): distinct per
    worker within a run (and per epoch for the streams restarted each epoch; up to 101 workers),
    identical on a rerun. The constants are the ones the stages have always used, so a seed keeps
    its meaning across versions; two runs with nearby seeds may share a stream (``init``: seed 1
    rank 0 = seed 0 rank 1), which is harmless since runs do not mix.
    """
    a, b, c = _SEED_STREAMS[stream]
    return base * a + epoch * b + rank * c
