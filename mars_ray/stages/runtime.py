"""Ray plumbing every stage shares: connecting, Ray Data actor pools, Ray Train runs and their state.

* ``ensure_ray``: a local instance on a laptop/CI, or the cluster under ``ray job submit``;
* ``map_images``: a stage's Ray Data actor pool over image ids;
* ``fit_torch`` → (workers: ``restored_state``, ``report_epoch``) → ``final_state``: one Ray Train
  run, resumable, whose last checkpoint holds the whole training state (``state.pt``);
* ``worker_seed``: every seed a Train worker derives from the run's seed;
* progress: while a ``mars`` console listens (``console.active()``), ``map_images`` and
  ``fit_torch`` count the work where it happens (images per batch in the actors, epochs on Train
  rank 0) on one small ``ProgressBoard`` actor, which a driver thread reads twice a second into
  ``console.Progress`` events.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import ray

from mars_ray import console
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
    if ray.is_initialized():
        return
    with _init_lock:  # threads of one driver (concurrent runs in a notebook or a test) start it once
        if not ray.is_initialized():
            _init(cfg)


_init_lock = threading.Lock()


def _init(cfg: RayConfig) -> None:
    global _started_here
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
    console.route_ray()  # Ray's loggers: before ray.init, which logs "Started a local Ray instance"
    ray.init(**kwargs)
    console.route_ray()  # …and its workers' output, now that Ray forwards it
    _started_here = True


def shutdown_if_started() -> None:
    """Stop Ray only when ``ensure_ray`` started it (a caller's own session is left alone)."""
    global _started_here
    _Tracker.stop()
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
    tracker = _Tracker.get()
    if tracker is not None:
        task = tracker.begin("epoch", None, unit="epoch")
        train_fn = _EpochProgress(train_fn, tracker.board, task)
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
    try:
        return trainer.fit()
    finally:
        if tracker is not None:
            tracker.end(task)


def map_images(
    ids: list[str],
    fn: type,
    fn_kwargs: dict[str, Any],
    *,
    num_actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0,
    batch_size: int = 8,
    progress: str | None = "images",
) -> "ray.data.Dataset":
    """Shard image ids over an actor pool: ``fn(**fn_kwargs)`` once per actor, then one call a batch.

    Rows in are ``{"image_id": str}``; ``fn.__call__(batch: dict[str, np.ndarray])`` returns what
    the stage needs. Enough blocks (≥ 4 per actor, ≤ 64 ids each) that the pool stays busy. Only
    the ids pass through the driver (a row dict each while the blocks are built, ~200 bytes an id:
    ~1.7 GB for Open Images' 9M; ``from_arrow`` would be 10x smaller but starts a remote task per
    block: extra worker processes, which on a loaded 2-core machine died in Ray's metrics thread).
    ``progress``: the label of this pass in the console's progress bar (one pass over the ids is
    expected; ``None`` for a dataset consumed many times, e.g. once per training epoch).
    """
    n_blocks = max(1, min(len(ids), max(4 * num_actors, len(ids) // 64)))
    ds = ray.data.from_items([{"image_id": i} for i in ids], override_num_blocks=n_blocks)
    res = actor_resources(cpus_per_actor, gpus_per_actor)
    tracker = _Tracker.get() if progress else None
    if tracker is not None:
        task = tracker.begin(progress, len(ids), unit="img")
        fn_kwargs = {"fn": fn, "fn_kwargs": fn_kwargs, "board": tracker.board, "task": task}
        fn = type(fn.__name__, (_CountImages,), {"__module__": _CountImages.__module__})
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


def report_epoch(metrics: dict[str, Any], state: dict[str, Any] | None = None, *, epochs: int | None = None) -> None:
    """In a Ray Train worker: report an epoch's numeric metrics, with ``state`` as the checkpoint.

    Rank 0 passes the training state (weights, optimiser, counters, history) when a checkpoint is
    due; the other ranks and off-epochs pass ``None``. ``epochs``: how many epochs this phase has
    (``metrics["epoch"]`` of them; ``metrics["phase"]`` names the phase), for the progress bar.
    """
    import tempfile

    import ray.train
    import torch

    if _worker_progress is not None and ray.train.get_context().get_world_rank() == 0 and "epoch" in metrics:
        board, task = _worker_progress
        label = f"{metrics['phase']} epoch" if metrics.get("phase") else "epoch"
        shown = {k: float(metrics[k]) for k in ("loss", "val_miou") if isinstance(metrics.get(k), (int, float))}
        board.epoch.remote(task, int(metrics["epoch"]), epochs, label, shown)
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


# -- progress: counts taken where the work happens, read on the driver ---------------------------


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Counts per pass (``task``): images added by Ray Data actors, the last epoch of rank 0.

    One per driver process; a ``.remote()`` call per batch or epoch, never waited for.
    """

    def __init__(self) -> None:
        self.tasks: dict[str, dict[str, Any]] = {}

    def add(self, task: str, n: int) -> None:
        self.tasks.setdefault(task, {"done": 0})["done"] += n

    def epoch(self, task: str, done: int, total: int | None, label: str, metrics: dict[str, float]) -> None:
        """Epoch ``done`` of ``total`` of phase ``label``; seconds per epoch from the previous
        report of the same phase (a phase's first epoch has none yet)."""
        now, prev = time.monotonic(), self.tasks.get(task) or {}
        per_item = None
        if prev.get("label") == label and done > prev.get("done", done):
            per_item = (now - prev["at"]) / (done - prev["done"])
        self.tasks[task] = {"done": done, "total": total, "label": label, "metrics": metrics, "at": now,
                            "per_item": per_item}

    def read(self, tasks: list[str]) -> dict[str, dict[str, Any] | None]:
        return {t: self.tasks.get(t) for t in tasks}

    def drop(self, tasks: list[str]) -> None:
        for t in tasks:
            self.tasks.pop(t, None)


class _CountImages:
    """Ray Data callable around a stage's callable: after each batch, ``board.add(task, len(batch))``.

    ``map_images`` subclasses it under the stage callable's name (Ray Data's operator names stay
    ``MapBatches(ClusterImages)`` …).
    """

    def __init__(self, *, fn: type, fn_kwargs: dict[str, Any], board: Any, task: str) -> None:
        self.inner = fn(**fn_kwargs)
        self.board, self.task = board, task

    def __call__(self, batch: dict[str, Any]) -> Any:
        out = self.inner(batch)
        self.board.add.remote(self.task, len(batch["image_id"]))
        return out


#: in a Ray Train worker of a tracked run: (board, task) for ``report_epoch``
_worker_progress: tuple[Any, str] | None = None


class _EpochProgress:
    """A Train worker function that first tells ``report_epoch`` where to count epochs."""

    def __init__(self, fn: Callable[[dict], None], board: Any, task: str) -> None:
        self.fn, self.board, self.task = fn, board, task
        self.__name__ = getattr(fn, "__name__", "train_fn")

    def __call__(self, config: dict) -> None:
        global _worker_progress
        _worker_progress = (self.board, self.task)
        try:
            self.fn(config)
        finally:
            _worker_progress = None


class _Tracker:
    """The driver's side: registers passes, polls the board twice a second in a daemon thread and
    logs ``console.Progress`` events. One per driver process, only while a console listens.

    A new pass supersedes unfinished earlier ones (stages run one at a time; a pass that raised
    never finishes); ``end`` (``fit_torch``) and reaching the total finish one.
    """

    POLL_S = 0.5
    _instance: "_Tracker | None" = None
    _guard = threading.Lock()

    def __init__(self) -> None:
        self.job = ray.get_runtime_context().get_job_id()
        self.board = ProgressBoard.remote()
        self.tasks: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mars-progress", daemon=True)
        self.thread.start()

    @classmethod
    def get(cls) -> "_Tracker | None":
        """The tracker of this Ray session, made on first use; ``None`` when no console listens."""
        if not console.active() or not ray.is_initialized():
            return None
        with cls._guard:
            t = cls._instance
            if t is None or t.stopped.is_set() or t.job != ray.get_runtime_context().get_job_id():
                if t is not None:
                    t.stopped.set()
                cls._instance = t = cls()
            return t

    @classmethod
    def stop(cls) -> None:
        with cls._guard:
            if cls._instance is not None:
                cls._instance.stopped.set()
                cls._instance = None

    def begin(self, label: str, total: int | None, *, unit: str) -> str:
        task = uuid.uuid4().hex[:12]
        with self.lock:
            stale = list(self.tasks)
            self.tasks = {task: {"label": label, "total": total, "unit": unit, "t0": time.monotonic(),
                                 "seen": None, "shown_at": 0.0, "stage": console.current_stage()}}
        if stale:
            self.board.drop.remote(stale)
        return task

    def end(self, task: str) -> None:
        """Finish ``task`` now: a last event from the board's count, then forget it."""
        with self.lock:
            info = self.tasks.pop(task, None)
        if info is None:
            return
        try:
            state = ray.get(self.board.read.remote([task]), timeout=10)[task]
        except (ray.exceptions.RayError, TimeoutError) as e:
            logger.debug("progress board unreadable (%s)", e)
            state = None
        self._emit(task, info, state, finished=True)
        self.board.drop.remote([task])

    def _run(self) -> None:
        while not self.stopped.wait(self.POLL_S):
            if not console.active() or not ray.is_initialized():  # nobody listens any more: leave Ray as found
                self._retire()
                return
            with self.lock:
                tasks = dict(self.tasks)
            if not tasks:
                continue
            try:
                states = ray.get(self.board.read.remote(list(tasks)), timeout=10)
            except (ray.exceptions.RayError, TimeoutError) as e:  # the board is only for display
                logger.debug("progress board unreadable (%s)", e)
                continue
            done = []
            for task, info in tasks.items():
                state = states.get(task)
                total = (state or {}).get("total", info["total"])
                finished = bool(total) and (state or {}).get("done", 0) >= total
                self._emit(task, info, state, finished=finished)
                if finished:
                    done.append(task)
            if done:
                with self.lock:
                    for task in done:
                        self.tasks.pop(task, None)
                self.board.drop.remote(done)

    def _retire(self) -> None:
        with _Tracker._guard:
            if _Tracker._instance is self:
                _Tracker._instance = None
        self.stopped.set()
        if ray.is_initialized():
            try:
                ray.kill(self.board)
            except (ray.exceptions.RayError, ValueError) as e:  # already gone with its Ray session
                logger.debug("progress board: %s", e)

    def _emit(self, task: str, info: dict[str, Any], state: dict[str, Any] | None, *, finished: bool) -> None:
        """Log a ``Progress`` when the count moved, the pass finished, or every 30 s (a heartbeat)."""
        state = state or {}
        seen = (state.get("done", 0), state.get("total", info["total"]))
        now = time.monotonic()
        if not finished and seen == info["seen"] and now - info["shown_at"] < console.HEARTBEAT_S:
            return
        info["seen"], info["shown_at"] = seen, now
        console.report_progress(console.Progress(
            task=task, label=state.get("label", info["label"]), done=seen[0], total=seen[1],
            elapsed=now - info["t0"], unit=info["unit"], metrics=state.get("metrics", {}), finished=finished,
            per_item=state.get("per_item"), stage=info["stage"]))
