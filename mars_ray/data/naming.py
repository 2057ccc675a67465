"""How other WSSS code bases name images, and matching those names to a dataset's image ids.

* IRN / AMN / W-OoD / BECO keep VOC ids as **ints**: ``voc12/dataloader.py`` reads the split with
  ``np.loadtxt(..., dtype=np.int32)`` (``2007_000032`` → ``2007000032``) and turns it back with
  ``decode_int_filename``: ``s = str(int(n)); s[:4] + "_" + s[4:]``.
* AMN keys COCO by the **int COCO image id** (``coco14/dataloader.py``: ``cls_labels_dict[int(name)]``)
  and names its COCO files ``'%012d' % id``; CLIMS / BECO write ``mask/train2014/{id}.png`` with the
  plain int; ToCo and the COCO release use ``COCO_train2014_000000000009``.
* MCTformer looks an id up as is and then with ``.jpg`` appended (``datasets.py``,
  ``load_image_label_list_from_npy``).

:class:`IdMatcher` maps any of these onto a dataset's ids (whatever convention the dataset uses).
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")

_COCO_NAME = re.compile(r"(?:COCO_[A-Za-z]+\d{4}_)?(\d+)")


def strip_image_suffix(name: str) -> str:
    """``2007_000032.jpg`` → ``2007_000032`` (``.jpg``/``.jpeg``/``.png``, any case); other names unchanged."""
    low = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


def voc_int_to_id(key: int) -> str:
    """IRN's ``decode_int_filename``: ``2007000032`` → ``2007_000032``."""
    s = str(int(key))
    return s[:4] + "_" + s[4:]


def coco_number(name: str) -> Optional[int]:
    """The COCO image id in ``COCO_train2014_000000000009``, ``000000000009`` or ``9``; else ``None``."""
    m = _COCO_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


class IdMatcher:
    """Maps external image names and int keys onto ``ids`` (a dataset's image ids).

    ``match_name``: the id itself, the id with an image suffix, or (for COCO-style ids) the same
    COCO image number written another way. ``match_voc_int`` / ``match_coco_int``: IRN-style VOC
    ints and AMN-style COCO ints. A COCO number that two ids share is never matched.
    """

    def __init__(self, ids: Iterable[str]) -> None:
        self.ids = set(ids)
        self._by_number: dict[int, Optional[str]] = {}
        for i in self.ids:
            n = coco_number(i)
            if n is not None:
                self._by_number[n] = None if n in self._by_number else i

    def match_name(self, name: str) -> Optional[str]:
        if name in self.ids:
            return name
        stem = strip_image_suffix(name)
        if stem in self.ids:
            return stem
        n = coco_number(stem)
        return self._by_number.get(n) if n is not None else None

    def match_voc_int(self, key: int) -> Optional[str]:
        i = voc_int_to_id(key)
        return i if i in self.ids else None

    def match_coco_int(self, key: int) -> Optional[str]:
        return self._by_number.get(int(key))


__all__ = ["IMAGE_SUFFIXES", "IdMatcher", "coco_number", "strip_image_suffix", "voc_int_to_id"]
