"""Models: USS feature extractors, segmentation nets, CAM classifiers; see ``registry``.

``load_all()`` imports every model module so that the registries are filled.
"""

import importlib

_MODULES = ("handcrafted", "adaptive", "vit", "small_cnn", "stego", "cam", "resnet", "deeplab")


def load_all() -> None:
    """Import each model family module (each registers its builders on import)."""
    for name in _MODULES:
        importlib.import_module(f"{__name__}.{name}")
