"""Cluster-wide named locks with leases, for artifacts on object stores (where ``fcntl`` cannot reach).

One named, detached async Ray actor (``mars_locks`` in namespace ``mars``) holds a lease table
``key → (holder, expiry)``. Any driver or worker of the cluster finds it by name:

* ``acquire(key, holder, ttl_s)`` waits until ``key`` is free, or its lease has expired (the holder
  died or hung without releasing), then gives it to ``holder`` for ``ttl_s`` seconds;
* ``renew(key, holder, ttl_s)`` extends a lease still held (``False`` when it was lost);
* ``release(key, holder)`` frees it and wakes the waiters.

Waiters are coroutines on the actor's event loop, so many calls wait at once without threads.
``cluster_lock(key)`` is the context manager stage code uses: it acquires, renews the lease from a
daemon thread every ``ttl_s / 3`` while the block runs, and releases on exit (also on error). A
process that dies inside the block stops renewing, and the next waiter takes over at most ``ttl_s``
later. The actor keeps its table in memory: if it dies, the next call starts an empty one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import ray

logger = logging.getLogger(__name__)

ACTOR_NAME = "mars_locks"
NAMESPACE = "mars"


class LockTable:
    """Per-key lease locks (the body of the ``mars_locks`` actor; plain asyncio, testable alone)."""

    def __init__(self) -> None:
        self._leases: dict[str, tuple[str, float]] = {}  # key → (holder, monotonic expiry)
        self._info: dict[str, dict[str, Any]] = {}  # key → what its holder said about itself (for messages)
        self._changed: Optional[asyncio.Condition] = None

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:  # made on the actor's event loop, at the first call
            self._changed = asyncio.Condition()
        return self._changed

    def _free_for(self, key: str, holder: str, now: float) -> bool:
        lease = self._leases.get(key)
        return lease is None or lease[0] == holder or lease[1] <= now

    async def acquire(self, key: str, holder: str, ttl_s: float, timeout_s: Optional[float] = None,
                      info: Optional[dict[str, Any]] = None) -> bool:
        """Take ``key`` for ``holder`` for ``ttl_s`` s; waits while another holder's lease is live.

        Returns ``True`` once held, ``False`` when ``timeout_s`` passed first (``None``: wait forever;
        ``0``: do not wait). A holder asking again for a key it holds gets it at once (its lease is
        extended). ``info`` (host, pid, since, command, …) is kept for :meth:`holder_info`.
        """
        if ttl_s <= 0:
            raise ValueError(f"lock {key!r}: ttl_s must be > 0, got {ttl_s}")
        cond = self._cond()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        async with cond:
            while True:
                now = time.monotonic()
                if self._free_for(key, holder, now):
                    old = self._leases.get(key)
                    if old is not None and old[0] != holder:
                        logger.warning("lock %r: lease of %s expired; %s takes over", key, old[0], holder)
                    self._leases[key] = (holder, now + ttl_s)
                    self._info[key] = {**(info or {}), "holder": holder}
                    return True
                wait = self._leases[key][1] - now  # wake when the lease would expire, if not before
                if deadline is not None:
                    if deadline <= now:
                        return False
                    wait = min(wait, deadline - now)
                try:
                    await asyncio.wait_for(cond.wait(), timeout=max(wait, 0.001))
                except asyncio.TimeoutError:
                    pass

    async def renew(self, key: str, holder: str, ttl_s: float) -> bool:
        """Extend ``holder``'s lease of ``key`` by ``ttl_s`` from now; ``False`` when it no longer holds it."""
        lease = self._leases.get(key)
        now = time.monotonic()
        if lease is None or lease[0] != holder:
            return False
        if lease[1] <= now:  # expired but nobody took it: still ours
            logger.warning("lock %r: %s renewed %.1f s after its lease expired", key, holder, now - lease[1])
        self._leases[key] = (holder, now + ttl_s)
        return True

    async def release(self, key: str, holder: str) -> bool:
        """Free ``key`` if ``holder`` holds it (``False`` otherwise) and wake the waiters."""
        cond = self._cond()
        async with cond:
            lease = self._leases.get(key)
            if lease is None or lease[0] != holder:
                return False
            del self._leases[key]
            self._info.pop(key, None)
            cond.notify_all()
            return True

    async def holder(self, key: str) -> Optional[str]:
        """The holder of a live lease on ``key``, or ``None``."""
        lease = self._leases.get(key)
        return lease[0] if lease is not None and lease[1] > time.monotonic() else None

    async def holder_info(self, key: str) -> Optional[dict[str, Any]]:
        """What the holder of a live lease on ``key`` said about itself (``info`` of ``acquire``), or ``None``."""
        return self._info.get(key) if await self.holder(key) is not None else None


def lock_actor() -> Any:
    """The cluster's lock actor (created on first use; Ray must be initialised)."""
    if not ray.is_initialized():
        raise RuntimeError("cluster locks need Ray: call ray.init / ensure_ray first")
    return (
        ray.remote(LockTable)
        .options(name=ACTOR_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                 num_cpus=0, max_concurrency=1000)
        .remote()
    )


def new_holder() -> str:
    """A holder id unique in the cluster, readable in logs: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class LeaseHeld(Exception):
    """``cluster_lock(..., wait=False)`` found the key held; ``info`` is what its holder said about itself."""

    def __init__(self, key: str, info: Optional[dict[str, Any]]) -> None:
        super().__init__(f"lock {key!r} is held by {(info or {}).get('holder', 'another holder')}")
        self.key, self.info = key, info


@contextmanager
def cluster_lock(key: str, ttl_s: float = 120.0, *, poll_s: float = 30.0, wait: bool = True,
                 info: Optional[dict[str, Any]] = None) -> Iterator[str]:
    """``with cluster_lock("features:s3://…"):`` hold ``key`` exclusively across the whole cluster.

    Waits for the key (asking the actor again every ``poll_s`` s, so a restarted actor or a lease
    lost by a killed holder never blocks forever), renews the lease every ``ttl_s / 3`` s from a
    daemon thread while the block runs, and releases it on exit. Yields the holder id. With
    ``wait=False`` a held key raises :class:`LeaseHeld` at once; ``info`` describes this holder
    to the others (``LeaseHeld.info``).
    """
    from ray.exceptions import RayActorError

    holder = new_holder()
    actor = lock_actor()
    t0 = time.monotonic()
    waited = False
    while True:
        try:
            if ray.get(actor.acquire.remote(key, holder, ttl_s, poll_s if wait else 0.0, info)):
                break
            if not wait:
                raise LeaseHeld(key, ray.get(actor.holder_info.remote(key)))
        except RayActorError as e:  # the lock actor died: its leases went with it; start a new one
            logger.warning("lock %r: lock actor lost (%s); asking a new one", key, e)
            time.sleep(1.0)
            actor = lock_actor()
            continue
        if not waited:
            logger.info("lock %r: held by another run, waiting", key)
            waited = True
    if waited:
        logger.info("lock %r: acquired after %.1f s", key, time.monotonic() - t0)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl_s / 3):
            try:
                if not ray.get(actor.renew.remote(key, holder, ttl_s)):
                    logger.warning("lock %r: lease of %s was lost (expired and taken over)", key, holder)
                    return
            except Exception as e:  # noqa: BLE001 - keep trying: the lease may still be live
                logger.warning("lock %r: renewing failed (%s)", key, e)

    thread = threading.Thread(target=renew, name=f"lease-{key[:40]}", daemon=True)
    thread.start()
    try:
        yield holder
    finally:
        stop.set()
        thread.join(timeout=5)
        try:
            ray.get(actor.release.remote(key, holder))
        except Exception as e:  # noqa: BLE001 - the lease expires by itself
            logger.warning("lock %r: release failed (%s); the lease expires in %.0f s", key, e, ttl_s)


__all__ = ["LeaseHeld", "LockTable", "cluster_lock", "lock_actor", "new_holder"]
