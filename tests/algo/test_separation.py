"""Separation score (no ground truth): high when chosen centroids separate from the rest, low without signal."""

from __future__ import annotations

import numpy as np
import pytest

from mars_ray.algo.centroids import select_debiased_centroids
from mars_ray.algo.separation import (
    SEPARATION_THRESHOLD,
    SeparationCounter,
    does_not_separate,
    separation_scores,
    separation_warnings,
)


def _selection(fg: np.ndarray, cls: np.ndarray, bg: np.ndarray, c: int):
    sel = select_debiased_centroids(fg, cls, bg, alpha=0.4, num_classes=c)
    return sel, separation_scores(fg, cls, sel.chosen, sel.centroids)


def _separable(seed: int = 0, d: int = 32, c: int = 3, n: int = 60):
    """Per class: objects near their own direction, contexts near a background direction that also fills bg."""
    rng = np.random.default_rng(seed)
    obj_dir = rng.normal(size=(c + 1, d))
    ctx_dir = rng.normal(size=(c + 1, d))
    fg, cls = [], []
    for k in range(1, c + 1):
        for i in range(n):
            base = obj_dir[k] if i % 2 == 0 else ctx_dir[k]
            fg.append(base + 0.3 * rng.normal(size=d))
            cls.append(k)
    generic = rng.normal(size=(4, d))
    bg = [ctx_dir[k] + 0.3 * rng.normal(size=d) for k in range(1, c + 1) for _ in range(20)]
    bg += [generic[j % 4] + 0.3 * rng.normal(size=d) for j in range(200)]
    return np.array(fg), np.array(cls), np.array(bg)


def test_high_on_separable_centroids() -> None:
    fg, cls, bg = _separable()
    sel, scores = _selection(fg, cls, bg, 3)
    assert set(scores) == {1, 2, 3}
    for k, s in scores.items():
        # half the centroids are objects, α = 0.4 chooses 40 %: the other 10 % are objects not chosen that
        # still activate V^c (harmless), so kept_not_chosen is 1/6 and the score 5/6
        assert s["score"] > 0.8 and s["kept_chosen"] > 0.95 and s["kept_not_chosen"] < 0.2, (k, s)
        assert s["n_chosen"] == 24 and s["n_not_chosen"] == 36
    assert does_not_separate(scores) == []


@pytest.mark.parametrize("seed, per_class", [(0, 80), (1, 80), (2, 80), (3, 8), (4, 5)])
def test_low_without_signal(seed: int, per_class: int) -> None:
    """Features that carry no signal: every centroid an independent random vector (few centroids too)."""
    rng = np.random.default_rng(seed)
    fg, cls, bg = rng.normal(size=(3 * per_class, 32)), np.repeat([1, 2, 3], per_class), rng.normal(size=(300, 32))
    _, scores = _selection(fg, cls, bg, 3)
    for s in scores.values():
        assert s["score"] < SEPARATION_THRESHOLD - 0.3, s
    assert does_not_separate(scores) == [1, 2, 3]


def test_low_when_objects_and_contexts_look_alike() -> None:
    """Contexts that the features see as the object: they activate V^c too, nothing is removed."""
    fg, cls, bg = _separable()
    rng = np.random.default_rng(1)
    same = fg.copy()
    for k in (1, 2, 3):  # contexts replaced by their class's object appearance
        rows = np.flatnonzero(cls == k)[1::2]
        same[rows] = fg[np.flatnonzero(cls == k)[0::2]] + 0.3 * rng.normal(size=(len(rows), fg.shape[1]))
    _, scores = _selection(same, cls, bg, 3)
    for s in scores.values():
        assert s["kept_chosen"] > 0.9 and s["kept_not_chosen"] > 0.9 and s["score"] < 0.1, s


def test_streaming_equals_in_memory_and_counts_weight() -> None:
    fg, cls, bg = _separable(seed=3)
    sel, scores = _selection(fg, cls, bg, 3)
    counts = np.random.default_rng(0).integers(1, 500, len(cls))
    whole = separation_scores(fg, cls, sel.chosen, sel.centroids, counts=counts)
    acc = SeparationCounter(sel.centroids, np.bincount(cls[sel.chosen], minlength=4))
    for s in range(0, len(cls), 37):
        acc.add(fg[s : s + 37], cls[s : s + 37], sel.chosen[s : s + 37], counts[s : s + 37])
    assert acc.scores() == whole
    # weights matter: one heavy, wrongly activating not-chosen centroid moves the share
    v = sel.centroids[1] / np.linalg.norm(sel.centroids[1])
    extra = separation_scores(np.vstack([fg, v]), np.r_[cls, 1], np.r_[sel.chosen, False], sel.centroids,
                              counts=np.r_[np.ones(len(cls)), 1e6])
    assert extra[1]["kept_not_chosen"] > 0.99 and extra[1]["score"] < 0.01


def test_errors_and_nan() -> None:
    v = np.eye(3, 4)
    with pytest.raises(ValueError, match="centroids"):
        SeparationCounter(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="chosen_counts"):
        SeparationCounter(v, np.zeros(2))
    acc = SeparationCounter(v, np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="vectors"):
        acc.add(np.zeros((2, 3)), np.array([1, 1]), np.array([True, False]))
    with pytest.raises(ValueError, match="class ids"):
        acc.add(np.zeros((1, 4)), np.array([3]), np.array([True]))
    acc.add(np.ones((1, 4)), np.array([1]), np.array([True]))  # one centroid: nothing not chosen
    assert np.isnan(acc.scores()[1]["score"])
    assert does_not_separate(acc.scores()) == []
    # one chosen and two not chosen: the chosen one has nothing to be compared with, so the class is not judged
    v = np.array([[0, 0, 0, 0], [1, 0, 0, 0]], float)
    one = separation_scores(np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], float), np.array([1, 1, 1]),
                            np.array([True, False, False]), v)
    assert np.isnan(one[1]["score"]) and does_not_separate(one) == []


def test_warning_lines() -> None:
    scores = {1: {"kept_chosen": 0.1, "kept_not_chosen": 0.0, "score": 0.1},
              2: {"kept_chosen": 0.95, "kept_not_chosen": 0.9, "score": 0.05},
              3: {"kept_chosen": 1.0, "kept_not_chosen": 0.0, "score": 1.0}}
    lines = separation_warnings(scores, ["background", "boat", "train", "cow"])
    assert len(lines) == 2
    assert lines[0].startswith("the USS features do not separate objects from their contexts for class boat")
    assert "debiasing may remove targets" in lines[0]
    assert "class train" in lines[1] and "remove little" in lines[1]


def test_warning_suggests_only_other_extractors() -> None:
    scores = {1: {"kept_chosen": 0.1, "kept_not_chosen": 0.0, "score": 0.1}}
    names = ["background", "boat"]
    line = separation_warnings(scores, names, extractor="adaptive")[0]
    assert "try another USS (features.extractor=texture, --uss or --features-dir)" in line
    assert "extractor=adaptive" not in line
    assert "another features.seed" in line  # the adaptive fit's seed
    assert "features.seed" not in separation_warnings(scores, names, extractor="texture")[0]
    assert "(features.extractor=adaptive, features.extractor=texture, --uss or --features-dir)" in \
        separation_warnings(scores, names)[0]  # unknown: all four
    assert "--features-dir" not in separation_warnings(scores, names, extractor="external")[0]
