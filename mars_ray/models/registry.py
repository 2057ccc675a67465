"""Tiny name → builder registries (house style: a dict filled by a decorator).

``FEATURES`` holds USS pixel-embedding extractors, ``SEGMENTERS`` segmentation networks,
``CLASSIFIERS`` CAM classifiers, ``BACKBONES`` feature backbones. A duplicate name raises;
``get`` of an unknown name raises ``ValueError`` listing the known ones.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, TypeVar

T = TypeVar("T", bound=Callable[..., Any])


class Registry:
    """A named dict of builders. ``@REG.register("name")`` adds one; ``REG.get(name, **kw)`` builds."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: Dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(fn: T) -> T:
            if name in self._builders:
                raise ValueError(f"duplicate {self.kind} name {name!r}")
            self._builders[name] = fn
            return fn

        return deco

    def names(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name: str) -> bool:
        return name in self._builders

    def builder(self, name: str) -> Callable[..., Any]:
        if name not in self._builders:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names()) or '(none)'}")
        return self._builders[name]

    def get(self, name: str, **kwargs: Any) -> Any:
        return self.builder(name)(**kwargs)


FEATURES = Registry("feature extractor")
SEGMENTERS = Registry("segmentation model")
CLASSIFIERS = Registry("classifier")
BACKBONES = Registry("backbone")
