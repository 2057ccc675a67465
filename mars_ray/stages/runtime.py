"""Connecting to Ray: a local instance on a laptop/CI, or the cluster under ``ray job submit``."""

from __future__ import annotations

import logging
import os

import ray

from mars_ray.config import RayConfig

logger = logging.getLogger(__name__)


def ensure_ray(cfg: RayConfig) -> None:
    """``ray.init`` once per process with the configured address/resources.

    Locally (``address`` empty) Ray starts in-process without dashboard; token auth and usage
    stats are switched off unless the environment says otherwise (RAY_NOTES.md). Under
    ``ray job submit`` the job's driver joins the cluster (``RAY_ADDRESS`` is set by Ray).
    """
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
