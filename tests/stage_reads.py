"""Which config settings a piece of code reads: ``with recorded_reads() as reads: …`` → ``{"select.alpha", …}``.

Every section dataclass of ``mars_ray.config`` gets a ``__getattribute__`` that notes each field read
while the block runs (the driver's reads: Ray workers get plain values, never config objects).
``config.validate`` reads every setting to check it, not to compute anything: its reads are not noted.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import fields
from typing import Any, Iterator

from mars_ray import config as C


@contextmanager
def recorded_reads() -> Iterator[set[str]]:
    reads: set[str] = set()
    paused = [False]
    patched = []
    for section, cls in C._section_types().items():
        names = frozenset(f.name for f in fields(cls))

        def getattribute(self, name, _section=section, _names=names):  # noqa: ANN001 - object protocol
            if name in _names and not paused[0]:
                reads.add(f"{_section}.{name}")
            return object.__getattribute__(self, name)

        cls.__getattribute__ = getattribute
        patched.append(cls)
    validate = C.validate

    def quiet_validate(cfg: Any) -> None:
        paused[0] = True
        try:
            validate(cfg)
        finally:
            paused[0] = False

    C.validate = quiet_validate
    try:
        yield reads
    finally:
        C.validate = validate
        for cls in patched:
            del cls.__getattribute__
