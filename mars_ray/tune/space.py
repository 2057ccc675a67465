"""Search-space files (``tune_spaces/*.yaml``): parse, check every value, map to Tune domains.

A *space* maps dotted config keys to search domains::

    objective: {metric: debiased_miou, mode: max}   # or debiased_fp/min, debiased_fn/min, val_miou/max
    params:
      select.alpha: {grid_search: [0.1, 0.2]}       # also choice: [..], uniform: [lo, hi],
      features.k_bg: {grid_search: [1, 2]}          #   loguniform: [lo, hi], randint: [lo, hi)
    num_samples: 1                                  # repeats of the grid / number of random samples
    max_concurrent_trials: 1
    scheduler: {type: fifo}                         # or {type: asha, grace_period: 1, reduction_factor: 2}
    search_alg: {type: basic}                       # Tune's BasicVariantGenerator (grid + random)
    set: {debias.crf: true}                         # overrides for every trial (--set wins)
    smoke: {params: {...}, set: {...}, num_samples: 1}   # what --smoke-test replaces

Every value a space can produce is checked by building the config with it (unknown keys, wrong
types, out-of-range values, empty grids) before Ray starts (``validate_space``).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from mars_ray import config as C
from mars_ray.storage import AnyPath

OBJECTIVES: dict[str, str] = {  # metric → the mode it is normally optimised in
    "debiased_miou": "max",
    "debiased_fp": "min",
    "debiased_fn": "min",
    "val_miou": "max",
}
EXPENSIVE = {"val_miou"}  # objectives that need train → evaluate
KINDS = ("grid_search", "choice", "uniform", "loguniform", "randint")
SPACE_KEYS = {"description", "objective", "params", "num_samples", "max_concurrent_trials", "scheduler",
              "search_alg", "set", "smoke"}


@dataclass(frozen=True)
class Space:
    """A parsed search-space file (after ``--smoke-test`` substitution)."""

    path: str
    params: dict[str, dict[str, Any]]  # key → {kind: args}
    metric: str
    mode: str
    num_samples: int = 1
    max_concurrent_trials: int = 1
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "fifo"})
    search_alg: dict[str, Any] = field(default_factory=lambda: {"type": "basic"})
    overrides: dict[str, Any] = field(default_factory=dict)
    name: str = ""  # the file's stem: the default MLflow experiment, plot titles

    @property
    def expensive(self) -> bool:
        return self.metric in EXPENSIVE


def load_space(path: AnyPath, *, smoke: bool = False) -> Space:
    """Read and check the shape of a space file (values are checked by ``validate_space``)."""
    raw = C.read_yaml_mapping(path, "search space")
    unknown = set(raw) - SPACE_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown entries {sorted(unknown)}; a space has {sorted(SPACE_KEYS)}")
    if smoke:
        sm = raw.get("smoke")
        if not isinstance(sm, dict):
            raise ValueError(f"{path}: --smoke-test needs a 'smoke:' mapping (params / set / num_samples)")
        bad = set(sm) - {"params", "set", "num_samples", "max_concurrent_trials"}
        if bad:
            raise ValueError(f"{path}: unknown entries in smoke: {sorted(bad)}")
        raw = {**raw, **{k: v for k, v in sm.items() if k != "set"},
               "set": {**C.flatten(raw.get("set") or {}), **C.flatten(sm.get("set") or {})}}
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise ValueError(f"{path}: 'params' must map at least one config key to a domain")
    parsed: dict[str, dict[str, Any]] = {}
    for key, dom in params.items():
        if not isinstance(dom, dict) or len(dom) != 1 or next(iter(dom)) not in KINDS:
            raise ValueError(f"{path}: params.{key}: expected one of {{{', '.join(KINDS)}: …}}, got {dom!r}")
        parsed[str(key)] = dict(dom)
    objective = raw.get("objective") or {"metric": "debiased_miou"}
    if not isinstance(objective, dict):
        raise ValueError(f"{path}: 'objective' must be {{metric: …, mode: max|min}}")
    metric = objective.get("metric", "debiased_miou")
    if metric not in OBJECTIVES:
        raise ValueError(f"{path}: objective.metric {metric!r} is not one of {sorted(OBJECTIVES)}")
    mode = objective.get("mode", OBJECTIVES[metric])
    if mode not in ("max", "min"):
        raise ValueError(f"{path}: objective.mode must be 'max' or 'min', got {mode!r}")
    scheduler = raw.get("scheduler") or {"type": "fifo"}
    if not isinstance(scheduler, dict) or scheduler.get("type") not in ("fifo", "asha"):
        raise ValueError(f"{path}: scheduler.type must be 'fifo' or 'asha', got {scheduler!r}")
    search_alg = raw.get("search_alg") or {"type": "basic"}
    if not isinstance(search_alg, dict) or search_alg.get("type") != "basic":
        raise ValueError(f"{path}: search_alg.type must be 'basic' (grid + random sampling), got {search_alg!r}")
    overrides = raw.get("set") or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"{path}: 'set' must map config keys to values")
    out = Space(
        path=str(path), name=path.stem, params=parsed, metric=metric, mode=mode,
        num_samples=_positive_int(path, "num_samples", raw.get("num_samples", 1)),
        max_concurrent_trials=_positive_int(path, "max_concurrent_trials", raw.get("max_concurrent_trials", 1)),
        scheduler=scheduler, search_alg=search_alg, overrides=C.flatten(overrides),
    )
    if out.scheduler["type"] == "asha" and not out.expensive:
        raise ValueError(f"{path}: ASHA needs an objective reported over epochs (val_miou), not {metric!r}")
    return out


def _positive_int(path: AnyPath, key: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{path}: {key} must be a positive integer, got {v!r}")
    return v


def _key_type(key: str) -> Any:
    section, name = key.split(".", 1)
    return typing.get_type_hints(typing.get_type_hints(C.Config)[section])[name]


def _check_value(space: Space, base: C.Config, key: str, value: Any) -> Any:
    """The value as the config stores it, or ``ValueError`` naming the space, key and value."""
    try:
        cfg = C.merge(base, {key: value}, source=space.path)
        C.validate(cfg)
    except ValueError as e:
        raise ValueError(f"{space.path}: params.{key} = {value!r}: {e}") from None
    section, name = key.split(".", 1)
    return C.to_dict(getattr(getattr(cfg, section), name))


def validate_space(space: Space, base: C.Config) -> dict[str, Any]:
    """Check every key and value a space can produce; returns the Tune ``param_space``.

    ``param_space`` holds the searched domains and, as constants, every other key of the flattened
    ``base`` config, so each trial's config (and its MLflow params) is the full config.
    """
    from ray import tune

    known = set(C.known_keys())
    domains: dict[str, Any] = {}
    for key, dom in space.params.items():
        if key not in known:
            raise ValueError(f"{space.path}: params.{key}: unknown config key (see `mars_ray.config.known_keys()`)")
        (kind, args), = dom.items()
        if kind in ("grid_search", "choice"):
            if not isinstance(args, list) or not args:
                raise ValueError(f"{space.path}: params.{key}: {kind} needs a non-empty list, got {args!r}")
            values = [_check_value(space, base, key, v) for v in args]
            domains[key] = tune.grid_search(values) if kind == "grid_search" else tune.choice(values)
            continue
        if not isinstance(args, list) or len(args) != 2 or not all(
            isinstance(a, (int, float)) and not isinstance(a, bool) for a in args
        ):
            raise ValueError(f"{space.path}: params.{key}: {kind} needs [low, high] numbers, got {args!r}")
        low, high = args
        typ = _key_type(key)
        if kind == "randint":
            if typ is not int or not all(isinstance(a, int) for a in args):
                raise ValueError(f"{space.path}: params.{key}: randint needs an integer key and integer bounds")
            if high <= low:
                raise ValueError(f"{space.path}: params.{key}: randint [{low}, {high}) is empty")
            _check_value(space, base, key, low)
            _check_value(space, base, key, high - 1)
            domains[key] = tune.randint(low, high)
            continue
        if typ is not float:
            raise ValueError(f"{space.path}: params.{key}: {kind} draws real numbers but the key is {typ.__name__}")
        if high <= low:
            raise ValueError(f"{space.path}: params.{key}: {kind} [{low}, {high}] is empty")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"{space.path}: params.{key}: loguniform needs low > 0, got {low}")
        _check_value(space, base, key, float(low))
        _check_value(space, base, key, float(high))
        domains[key] = tune.uniform(low, high) if kind == "uniform" else tune.loguniform(low, high)
    constants = {k: v for k, v in C.flatten(C.to_dict(base)).items() if k not in domains}
    return {**constants, **domains}


def grid_size(space: Space) -> int:
    """Trials the sweep will run: product of the grids × num_samples."""
    n = 1
    for dom in space.params.values():
        if "grid_search" in dom:
            n *= len(dom["grid_search"])
    return n * space.num_samples


def grid_values(space: Space, key: str) -> list[Any]:
    """The values a searched key can take (a continuous domain: its upper bound); ``[]`` if not searched."""
    dom = space.params.get(key)
    if not dom:
        return []
    (kind, args), = dom.items()
    return list(args) if kind in ("grid_search", "choice") else [args[1]]


def milestones(epochs: int, scheduler: Mapping[str, Any]) -> list[int]:
    """Epoch counts at which a trial reports: ASHA's rungs (grace·η^k) below ``epochs``, then ``epochs``."""
    if scheduler.get("type") != "asha":
        return [epochs]
    grace = int(scheduler.get("grace_period", 1))
    eta = float(scheduler.get("reduction_factor", 2))
    out, r = [], grace
    while r < epochs:
        out.append(r)
        r = max(r + 1, int(math.ceil(r * eta)))
    return out + [epochs]
