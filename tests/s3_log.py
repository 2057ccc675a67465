"""The requests an in-process moto S3 server answers, read from its access log (werkzeug's logger).

One line a request, logged before the response is sent, so a request the client saw answered is
in the list. Requests of other processes (Ray workers) hitting the same server in the block are
counted too: count where no worker runs. Used by the ``s3_requests`` fixture and
``benchmarks/replace_requests.py``.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from typing import Iterator

_LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/')


class S3Requests(list):
    """``(method, path?query)`` of each request, in order."""

    def count(self, method: str | None = None, *, where: str = "") -> int:  # type: ignore[override]
        return sum(1 for m, target in self if (method is None or m == method) and where in target)


class _Collect(logging.Handler):
    def __init__(self, into: S3Requests) -> None:
        super().__init__(logging.INFO)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        m = _LINE.search(record.getMessage())
        if m:
            self.into.append((m.group(1), m.group(2)))


@contextmanager
def collect() -> Iterator[S3Requests]:
    """``with collect() as got:`` every request the server handles in the block."""
    got = S3Requests()
    log, handler = logging.getLogger("werkzeug"), _Collect(got)
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield got
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate
