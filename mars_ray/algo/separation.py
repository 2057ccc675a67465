"""Do the chosen centroids separate from the rest? A per-class score that needs no ground truth.

MARS keeps a pseudo-label pixel of class c when its activation ReLU(cos(F, V^c)) exceeds the
debias threshold (Eq 4), V^c being the mean of the class's chosen centroids (Eq 2-3). Applied to
the centroids themselves, the same rule says what debiasing will do to the regions they stand for:

* ``kept_chosen``: the share of the chosen centroids' pixels (weighted by ``count``) whose
  centroid activates V^c above the threshold: the regions MARS believes are the object. Each
  chosen centroid is compared with V^c *without itself* (leave-one-out: ``(n·V^c - f)/(n - 1)``),
  else with few chosen centroids a centroid would activate its own share of the mean;
* ``kept_not_chosen``: the same share for the centroids that were not chosen: the regions MARS
  believes are biased context;
* ``score = kept_chosen - kept_not_chosen`` in [-1, 1].

When the USS features separate objects from their contexts, the chosen centroids (objects) sit
close to V^c and the others (contexts) far from it: the score is near 1. It is near 0 in the two
ways separation fails: features that carry no signal (V^c, a mean of unrelated directions, is short
and activates even its own members weakly: ``kept_chosen`` low, debiasing removes targets), and
features that see objects and contexts alike (both groups activate: ``kept_not_chosen`` high,
debiasing removes little). A class without any bias (every centroid an object) also scores low
with ``kept_chosen`` high; that one is harmless, and ``kept_chosen`` tells the cases apart.

Why not a gap of the bias distances (Eq 1) of chosen vs not-chosen centroids? The top-α split
always produces one: for a unimodal (e.g. Gaussian) sample of distances the standardised gap is
already ~2.6 pooled within-group standard deviations at α = 0.4, so that statistic needs a null
calibration that depends on the unknown distribution; this one is calibrated by the threshold
that the pipeline itself applies.

``SEPARATION_THRESHOLD`` (0.5): a class scoring below it "does not separate". Our choice: halfway
between no separation (0) and perfect separation (1); below it, fewer than half of the pixels MARS
would act on are treated as the split says (e.g. kept_chosen 0.7 with kept_not_chosen 0.3 is 0.4).
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

SEPARATION_THRESHOLD = 0.5
_EPS = 1e-12


class SeparationCounter:
    """Streaming form of :func:`separation_scores` over chunks of the foreground centroid table.

    ``SeparationCounter(V [C+1, d], chosen_counts [C+1])`` (V^c and how many centroids each mean
    averages, ``class_sums``' counts), then ``add(vectors [n, d], class_ids [n], chosen [n], counts [n])``
    per chunk,
    ``scores() -> {class_id: {"kept_chosen", "kept_not_chosen", "score", "n_chosen", "n_not_chosen"}}``.
    """

    def __init__(self, centroids: np.ndarray, chosen_counts: np.ndarray, *, threshold: float = 0.5) -> None:
        c = np.asarray(centroids, dtype=np.float64)
        if c.ndim != 2:
            raise ValueError(f"centroids must be [C+1, d], got {c.shape}")
        n = np.asarray(chosen_counts, dtype=np.float64)
        if n.shape != (c.shape[0],):
            raise ValueError(f"chosen_counts must be [{c.shape[0]}], got {n.shape}")
        self.v = c
        self.v_sum = c * n[:, None]  # the sum of the chosen vectors, for leave-one-out means
        self.n_chosen = n
        self.v_hat = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), _EPS)
        self.threshold = float(threshold)
        n = c.shape[0]
        self._mass = np.zeros((n, 2), dtype=np.float64)  # [class, chosen?] pixel mass
        self._kept = np.zeros((n, 2), dtype=np.float64)  # … of it whose centroid activates V^c
        self._rows = np.zeros((n, 2), dtype=np.int64)

    def add(self, vectors: np.ndarray, class_ids: np.ndarray, chosen: np.ndarray,
            counts: np.ndarray | None = None) -> None:
        """Accumulate one chunk; ``counts`` (pixels per centroid) default to 1 each."""
        x = np.asarray(vectors, dtype=np.float64)
        cls = np.asarray(class_ids).astype(np.int64)
        ch = np.asarray(chosen, dtype=bool).astype(np.int64)
        w = np.ones(len(cls)) if counts is None else np.asarray(counts, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.v_hat.shape[1]:
            raise ValueError(f"vectors must be [n, {self.v_hat.shape[1]}], got {x.shape}")
        if not (cls.shape == ch.shape == w.shape == (x.shape[0],)):
            raise ValueError(f"class_ids {cls.shape}, chosen {ch.shape}, counts {w.shape} must be [{x.shape[0]}]")
        if cls.size and (cls.min() < 1 or cls.max() >= self.v_hat.shape[0]):
            raise ValueError(f"class ids must be in 1..{self.v_hat.shape[0] - 1}, got {cls.min()}..{cls.max()}")
        x_hat = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)
        ref = self.v[cls].copy()
        own = ch.astype(bool)
        n_c = self.n_chosen[cls[own]]
        # leave-one-out for chosen rows (a class with one chosen centroid has nothing left: cos 0)
        ref[own] = (self.v_sum[cls[own]] - x[own]) / np.maximum(n_c - 1, 1)[:, None]
        ref[own & (self.n_chosen[cls] <= 1)] = 0.0
        ref_hat = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), _EPS)
        cos = np.einsum("nd,nd->n", x_hat, ref_hat)
        kept = (cos > self.threshold).astype(np.float64)
        np.add.at(self._mass, (cls, ch), w)
        np.add.at(self._kept, (cls, ch), w * kept)
        np.add.at(self._rows, (cls, ch), 1)

    def scores(self) -> dict[int, dict[str, float]]:
        out: dict[int, dict[str, float]] = {}
        for c in np.flatnonzero(self._rows.sum(axis=1)):
            share = np.divide(self._kept[c], self._mass[c], out=np.full(2, np.nan), where=self._mass[c] > 0)
            kept_not, kept_ch = float(share[0]), float(share[1])
            # one chosen centroid leaves nothing to compare it with (leave-one-out): not judged, as no not-chosen one
            judged = np.isfinite(share).all() and self.n_chosen[c] > 1
            score = kept_ch - kept_not if judged else float("nan")
            out[int(c)] = {"score": score, "kept_chosen": kept_ch, "kept_not_chosen": kept_not,
                           "n_chosen": int(self._rows[c, 1]), "n_not_chosen": int(self._rows[c, 0])}
        return out


def separation_scores(
    vectors: np.ndarray,
    class_ids: np.ndarray,
    chosen: np.ndarray,
    centroids: np.ndarray,
    *,
    counts: np.ndarray | None = None,
    threshold: float = 0.5,
) -> dict[int, dict[str, float]]:
    """Per class, how well the chosen centroids separate from the not-chosen ones (module docstring).

    Args:
        vectors: foreground centroids ``[N, d]``; class_ids ``[N]`` in 1..C; chosen bool ``[N]`` (Eq 2);
        centroids: V ``[C+1, d]`` (Eq 3, ``Selection.centroids``); counts: pixels per centroid ``[N]``
            (default 1 each); threshold: the debias threshold of Eq 4.

    Returns:
        ``{class_id: {"kept_chosen", "kept_not_chosen", "score", "n_chosen", "n_not_chosen"}}`` for every
        class with centroids; ``score`` is NaN (not judged) when a class has no not-chosen centroid or a
        single chosen one (nothing for leave-one-out to compare it with).

    Raises:
        ValueError: inconsistent shapes or class ids outside 1..C.
    """
    cls = np.asarray(class_ids).astype(np.int64)
    ch = np.asarray(chosen, dtype=bool)
    n = np.bincount(cls[ch], minlength=np.asarray(centroids).shape[0]) if cls.size else np.zeros(len(centroids))
    acc = SeparationCounter(centroids, n[: np.asarray(centroids).shape[0]], threshold=threshold)
    acc.add(vectors, class_ids, chosen, counts)
    return acc.scores()


def does_not_separate(scores: dict[int, dict[str, float]], threshold: float = SEPARATION_THRESHOLD) -> list[int]:
    """The classes whose score is below ``threshold`` (NaN scores are not judged)."""
    return [c for c, s in sorted(scores.items()) if np.isfinite(s["score"]) and s["score"] < threshold]


#: the USS a warning can suggest, by ``features.extractor`` (``"external"``: ``--features-dir``)
_ALTERNATIVES = {"adaptive": "features.extractor=adaptive", "texture": "features.extractor=texture",
                 "stego": "--uss", "external": "--features-dir"}


def _other_extractors(current: str | None) -> str:
    """``"a, b or c"``: the USS to try instead of ``current`` (all of them when it is unknown)."""
    names = [v for k, v in _ALTERNATIVES.items() if k != current]
    return ", ".join(names[:-1]) + " or " + names[-1]


def separation_warnings(scores: dict[int, dict[str, float]], class_names: list[str],
                        threshold: float = SEPARATION_THRESHOLD, extractor: str | None = None) -> list[str]:
    """One log line per class that does not separate (``class_names`` indexed by class id, background first).

    ``extractor``: the USS in use (a ``features.extractor`` name, or ``"external"``), which the line
    then does not suggest; with ``"adaptive"`` the line also says how to see what a refit changes
    (``features.seed``).

    A class whose chosen centroids activate their own mean (``kept_chosen`` >= 0.5) but whose other
    centroids do too has nothing MARS can remove with these features (no bias, or a bias the features
    do not see); otherwise debiasing may remove the targets themselves.
    """
    lines = []
    others = _other_extractors(extractor)
    for c in does_not_separate(scores, threshold):
        s = scores[c]
        name = class_names[c] if c < len(class_names) else str(c)
        head = (f"the USS features do not separate objects from their contexts for class {name}; debiasing may "
                f"remove targets (separation {s['score']:.2f} < {threshold}: V^c keeps {s['kept_chosen']:.0%} of the "
                f"chosen and {s['kept_not_chosen']:.0%} of the other centroids' pixels)")
        if s["kept_chosen"] >= 0.5:  # both groups activate V^c: more likely little is removed
            tail = ("; both groups look alike to these features, so it will more likely remove little: fine if the "
                    f"class has no co-occurring context, else try another USS ({others})")
        else:
            tail = f"; try another USS ({others}) or a different select.alpha"
        if extractor == "adaptive":  # its fit moves such a class's labels most (README, "When the features ...")
            tail += "; a rerun with another features.seed shows how stable its labels are"
        lines.append(head + tail)
    return lines


__all__ = ["SEPARATION_THRESHOLD", "SeparationCounter", "does_not_separate", "separation_scores",
           "separation_warnings"]
