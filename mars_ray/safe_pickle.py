"""Restricted unpickling of the pickled files other WSSS / USS code bases write.

Several repositories save Python objects rather than plain arrays:

* IRN / AMN / W-OoD / BECO ``cls_labels.npy`` and ToCo ``cls_labels_onehot.npy``: ``np.save`` of a
  dict (a 0-d object array, pickled);
* IRN / AMN / PSA / MCTformer / ToCo CAM files ``{id}.npy``: ``np.save`` of a dict holding numpy
  arrays and, for IRN and AMN, torch tensors (``keys``, ``cam``);
* STEGO's Lightning ``.ckpt``: ``torch.save`` of a dict whose ``hyper_parameters["cfg"]`` is an
  OmegaConf ``DictConfig``.

``np.load(allow_pickle=True)`` or ``torch.load(weights_only=False)`` would run whatever the pickle
names. Here only an allowlist of globals resolves to the real object (numpy array reconstruction,
torch tensor rebuilding, plain container and scalar types, ``typing.Any``, ``pathlib`` paths);
every other global becomes a :class:`Stub` subclass that merely records its constructor arguments,
state and items, so nothing outside the allowlist runs. :func:`plain` turns OmegaConf stubs
(``DictConfig``/``ListConfig``/value nodes) back into plain dicts, lists and values, so the config
of a STEGO checkpoint is readable without ``omegaconf`` installed.
"""

from __future__ import annotations

import io
import pickle
import types
from typing import IO, Any

import numpy as np

#: (module, name) pairs that resolve to the real object. Everything else becomes a Stub.
_ALLOWED: frozenset[tuple[str, str]] = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"), ("torch.storage", "_load_from_bytes"),
    ("torch", "Size"), ("torch", "Tensor"), ("torch", "device"), ("torch.nn.parameter", "Parameter"),
    ("collections", "OrderedDict"), ("collections", "defaultdict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "int"),
    ("builtins", "float"), ("builtins", "str"), ("builtins", "bool"), ("builtins", "bytes"),
    ("builtins", "bytearray"), ("typing", "Any"),
    ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
})  # fmt: skip


class Stub:
    """Stand-in for an object of a class that is not on the allowlist.

    ``stub_module``/``stub_name`` name the original class; ``args`` are the constructor arguments,
    ``state`` what ``__setstate__`` received, ``items``/``elements`` what a dict or list subclass held.
    """

    stub_module = ""
    stub_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> "Stub":
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        obj.items, obj.elements = {}, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE calls the class: keep the arguments
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.elements.append(value)

    def extend(self, values: Any) -> None:
        self.elements.extend(values)

    def __repr__(self) -> str:
        return f"<stub {self.stub_module}.{self.stub_name}>"


_STUBS: dict[tuple[str, str], type] = {}


def _stub_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _STUBS:
        _STUBS[key] = type(f"Stub_{name}", (Stub,), {"stub_module": module, "stub_name": name})
    return _STUBS[key]


def _resolve(module: str, name: str) -> Any:
    if module == "__builtin__":
        module = "builtins"
    if (module, name) in _ALLOWED:
        if module == "builtins":
            import builtins

            return getattr(builtins, name)
        import importlib

        return getattr(importlib.import_module(module), name)
    if module == "torch":
        import torch

        obj = getattr(torch, name, None)  # dtypes (torch.float32) and typed storages (torch.FloatStorage)
        if isinstance(obj, torch.dtype) or (isinstance(obj, type) and name.endswith("Storage")):
            return obj
    return _stub_class(module, name)


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` resolves only allowlisted globals (see module docstring)."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102
        return _resolve(module, name)


def load(f: IO[bytes]) -> Any:
    """Unpickle one object from ``f`` with :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(f, encoding="latin1").load()


def load_npy(data: bytes, path: str = "<npy>") -> Any:
    """The content of a ``.npy`` file: a plain array, or the object of a 0-d object array (``np.save(dict)``).

    Object arrays are unpickled with :class:`RestrictedUnpickler`. Raises ``ValueError`` naming
    ``path`` for a file that is not a ``.npy`` array.
    """
    f = io.BytesIO(data)
    try:
        major, _ = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = reader(f)
    except Exception as e:  # noqa: BLE001 - any header problem means "not a .npy file"
        raise ValueError(f"{path}: not a .npy file ({e})") from None
    if not dtype.hasobject:
        f.seek(0)
        return np.load(f, allow_pickle=False)
    try:
        arr = load(f)
    except Exception as e:  # noqa: BLE001 - corrupt pickles fail in many ways
        raise ValueError(f"{path}: cannot unpickle the object array ({type(e).__name__}: {e})") from None
    if not isinstance(arr, np.ndarray) or tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{path}: pickled content is not the {shape} object array its header announces")
    return arr.item() if arr.shape == () else arr


def _torch_pickle_module() -> types.ModuleType:
    mod = types.ModuleType("mars_ray_restricted_pickle")
    mod.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
    mod.load = load  # type: ignore[attr-defined]
    mod.__dict__["Pickler"] = pickle.Pickler
    return mod


def torch_load(f: IO[bytes]) -> Any:
    """``torch.load`` of a checkpoint whose pickle may name non-tensor classes (e.g. OmegaConf configs).

    Tensors load as usual (CPU); unknown classes become :class:`Stub` objects instead of running.
    """
    import torch

    return torch.load(f, map_location="cpu", weights_only=False, pickle_module=_torch_pickle_module())


def plain(obj: Any) -> Any:
    """OmegaConf stubs (``DictConfig``, ``ListConfig``, value nodes) → plain dicts, lists, values.

    An OmegaConf container pickles its ``__dict__``: ``_content`` (a dict of key → node, a list of
    nodes, or ``None``/a string for missing or interpolated values); a value node holds ``_val``.
    Other objects are returned with their dicts, lists and tuples converted recursively.
    """
    if isinstance(obj, Stub):
        state = obj.state if isinstance(obj.state, dict) else {}
        if "_content" in state:
            return plain(state["_content"])
        if "_val" in state:
            return plain(state["_val"])
        if obj.items:
            return {k: plain(v) for k, v in obj.items.items()}
        if obj.elements:
            return [plain(v) for v in obj.elements]
        return obj
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj


__all__ = ["RestrictedUnpickler", "Stub", "load", "load_npy", "plain", "torch_load"]
