"""Test seam of the fault-injection tests (``tests/e2e/test_faults.py``): die at a named point. Off by default.

With ``MARS_KILL_AT=<point>[:<n>]`` in the environment, the ``n``-th time (default the first) this
process passes ``point(<point>)`` it sends ``SIGKILL`` to its own process group — what ``kill -9
-PGID`` does to a ``mars`` command started in its own session (the tests start it so), the
Ray processes it started included; a process that does not lead its group kills only itself. Without the variable ``point`` returns at once and does nothing.

Points (every stage ``S``): ``S.begin`` — ``StageDir.begin`` done (manifest ``running``, an older
artifact set aside); ``S.finish`` — every output written, the manifest not yet ``complete``;
``S.pointer`` (object stores) — the artifact's prefix ``complete``, the pointer not yet moved. Inside a
stage: ``features.table`` (the table written under its temporary name, not yet renamed),
``select.chosen`` (``chosen.parquet`` written, the centroids not yet), ``wsss.classifier`` (the
classifier saved, no CAM label yet), ``train.model`` (training done, ``model.pt`` written, the
predictions not yet), ``uss.checkpoint`` (``checkpoint.pt`` written, the manifest not yet).
"""

from __future__ import annotations

import logging
import os
import signal

logger = logging.getLogger(__name__)

ENV = "MARS_KILL_AT"
_passed: dict[str, int] = {}


def point(name: str) -> None:
    """Die here (``SIGKILL`` to the process group) when ``$MARS_KILL_AT`` names this point and count."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    want, _, nth = spec.partition(":")
    if want != name:
        return
    _passed[name] = _passed.get(name, 0) + 1
    if _passed[name] >= int(nth or 1):
        if os.getpgrp() != os.getpid():  # not a group leader: never take the caller's group down
            os.kill(os.getpid(), signal.SIGKILL)
        logger.warning("%s=%s: killing process group %d", ENV, spec, os.getpgrp())
        os.killpg(os.getpgrp(), signal.SIGKILL)


__all__ = ["ENV", "point"]
