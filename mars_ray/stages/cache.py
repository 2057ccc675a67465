"""The shared ``features`` cache: one content-addressed artifact per key, linked into each run.

With ``features.cache_dir`` set, the ``features`` artifact is computed once into
``CACHE/features-<key>/`` and ``RUN/features`` points at it, so runs that differ only downstream
(e.g. Tune trials differing in α) share one clustering. The key is the stage's own (config slice +
input fingerprints), so select/debias manifests do not see the difference.

Local cache and run folder: an exclusive ``fcntl`` lock per key and a symlink
``RUN/features -> CACHE/features-<key>``. When either is an object-store URI (``mars_ray.storage``):
a cluster-wide lease lock (``stages.locks``) and, since object stores have no symlinks,
``RUN/features/manifest.json`` is a complete copy of the cache's manifest plus
``"link": "<cache folder>"``. Readers find the artifact through :func:`resolve`.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable

from mars_ray import storage
from mars_ray.artifacts import LINK, MANIFEST, POINTER, PREFIX, PREVIOUS, StageDir, atomic_write_json, current
from mars_ray.artifacts import read_manifest
from mars_ray.config import RayConfig
from mars_ray.storage import AnyPath

logger = logging.getLogger(__name__)

FEATURES = "features"


def cache_folder(cache_dir: AnyPath, key: str) -> AnyPath:
    """``CACHE/features-<key>``: where the artifact of ``key`` lives."""
    return cache_dir / f"{FEATURES}-{key}"


def resolve(run_dir: AnyPath) -> AnyPath:
    """The folder that really holds this run's ``features`` artifact (its table and manifest).

    ``RUN/features`` itself, or the cache folder it links to: a local symlink is followed, and a
    link manifest (``"link"`` in ``RUN/features/manifest.json``, written when the cache or the
    run is on an object store) names its target; on an object store, that folder's current
    prefix (``artifacts.current``). ``FileNotFoundError`` naming both when the target no longer
    holds the finished artifact the link was made for.
    """
    p = run_dir / FEATURES
    if p.is_symlink():
        return p.resolve()
    return current(p)


def run_cached(sd: StageDir, cache_dir: AnyPath, compute: Callable[[StageDir], None], *, ray_cfg: RayConfig) -> AnyPath:
    """Compute ``CACHE/features-<key>`` once (``compute(cache stage dir)``), link ``sd.root`` to it.

    A lock per key makes concurrent runs (Tune trials sharing K_bg) wait for the one computing it
    and then find it complete; different keys proceed in parallel.
    """
    target = cache_folder(cache_dir, sd.key)
    csd = StageDir(target, sd.stage, sd.key, sd.config, sd.inputs)
    if not storage.is_uri(cache_dir) and not storage.is_uri(sd.root):
        import fcntl

        cache_dir.mkdir(parents=True, exist_ok=True)
        with open(cache_dir / f".{FEATURES}-{sd.key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _compute_once(csd, compute)
        _link(sd.root, target)
        return sd.root
    from mars_ray.stages.locks import cluster_lock
    from mars_ray.stages.runtime import ensure_ray

    ensure_ray(ray_cfg)
    with cluster_lock(f"features:{storage.absolute(target)}"):
        _compute_once(csd, compute)
    _link_manifest(sd.root, target)
    return sd.root


def _compute_once(csd: StageDir, compute: Callable[[StageDir], None]) -> None:
    if csd.is_complete():
        logger.info("features: cached in %s, reusing", csd.path)
    else:
        compute(csd)


def _link(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` atomically (replacing an older link or a finished stage folder)."""
    if link.is_symlink() and Path(os.readlink(link)) == target.resolve():
        return
    if link.is_dir() and not link.is_symlink():
        if read_manifest(link) is None and any(link.iterdir()):
            raise ValueError(f"{link} exists, is not empty and has no manifest.json: refusing to replace it")
        shutil.rmtree(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.link-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.resolve(), target_is_directory=True)
    os.replace(tmp, link)


def _link_manifest(link: AnyPath, target: AnyPath) -> None:
    """Make ``link/manifest.json`` the cache's complete manifest plus ``"link": target`` (no symlinks).

    Left as it is when it already links there with the same key (a rerun changes nothing). A
    finished stage folder or an older link is replaced; a folder without a manifest is refused.
    """
    tm = read_manifest(target)
    if not tm or tm.get("status") != "complete":
        raise FileNotFoundError(f"{target}: no finished features artifact to link {link} to")
    where = storage.absolute(target)
    if link.is_symlink():  # a local symlink from an earlier run with a local cache
        link.unlink()
    m = read_manifest(link)
    if m and m.get(LINK) == where and m.get("key") == tm.get("key") and m.get("status") == "complete":
        return
    if link.exists():
        if m is None and any(not c.name.startswith(PREFIX) for c in link.iterdir()):
            raise ValueError(f"{link} exists, is not empty and has no {MANIFEST}: refusing to replace it")
        storage.rmtree(link)
    pointer = (POINTER, PREVIOUS)  # the cache folder's own prefixes: ``current`` follows LINK, then those
    atomic_write_json(link / MANIFEST, {**{k: v for k, v in tm.items() if k not in pointer}, LINK: where})


__all__ = ["LINK", "cache_folder", "resolve", "run_cached"]
