"""The built-in data + texture extractor exercise MARS honestly (no Ray).

features → per-image K-means (Sec 3.2) → debiased centroid selection (Eq 1-3, α = 0.4, K_bg = 2)
→ activation and binarisation (Eq 4) → relabelling (Eq 5) must lower FP and raise mIoU of the
biased pseudo labels, and the chosen centroids must lie on objects; a colour threshold — even the
best single-channel rule per class, picked with the ground truth — must not get close.

Reference numbers (seed 0; n_train 24, size 64 here; 60 / 96 px in brackets), metrics on train:
pseudo mIoU 0.49 FP 0.61 FN 0.01 (0.49 / 0.61 / 0.00); MARS no CRF 0.77 / 0.25 / 0.03
(0.81 / 0.22 / 0.01); MARS + default CRF 0.67 / 0.00 / 0.41 (0.76 / 0.00 / 0.29);
colour oracle 0.54 / 0.49 / 0.07 (0.51 / 0.57 / 0.02).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from mars_ray.algo.centroids import select_debiased_centroids
from mars_ray.algo.clustering import cluster_regions
from mars_ray.algo.debias import activation_map, binarize_activation, debias_label
from mars_ray.algo.metrics import ConfusionMatrix, map_biased
from mars_ray.data.label_io import read_image, read_label
from mars_ray.data.synthetic import PSEUDO_DIR, make_biased_dataset
from mars_ray.data.voc import VOCDataset
from mars_ray.models.handcrafted import build_texture_extractor

Sample = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # image, features, pseudo, gt


@pytest.fixture(scope="module")
def mars_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = make_biased_dataset(tmp_path_factory.mktemp("bias") / "d", n_train=24, n_val=4, size=64, seed=0)
    ds, ext = VOCDataset(root), build_texture_extractor()
    samples: dict[str, Sample] = {}
    for i in ds.ids("train"):
        img = read_image(ds.image_path(i))
        f = ext(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)[0].numpy()
        gt = read_label(ds.gt_path(i))  # type: ignore[arg-type]
        samples[i] = (img, f, read_label(root / PSEUDO_DIR / f"{i}.png"), gt)

    fg, fg_class, bg, purity = [], [], [], []
    for img, f, pseudo, gt in samples.values():
        rc = cluster_regions(f, pseudo, k_fg=2, k_bg=2, seed=0)
        for r in range(len(rc)):
            if rc.is_bg[r]:
                bg.append(rc.vector[r])
            else:
                fg.append(rc.vector[r])
                fg_class.append(rc.class_id[r])
                purity.append(float((gt[rc.assignment == r] == rc.class_id[r]).mean()))
    sel = select_debiased_centroids(np.array(fg), np.array(fg_class), np.array(bg), alpha=0.4,
                                    num_classes=ds.num_classes)
    return {"samples": samples, "sel": sel, "purity": np.array(purity), "C": ds.num_classes}


def _scores(run: dict, crf: dict | None = None) -> tuple[dict, dict]:
    C = run["C"]
    cm_pseudo, cm_mars = ConfusionMatrix(C + 1), ConfusionMatrix(C + 1)
    for img, f, pseudo, gt in run["samples"].values():
        classes = sorted(set(np.unique(pseudo).tolist()) & set(range(1, C + 1)))
        keep = binarize_activation(activation_map(f, run["sel"].centroids[classes]), threshold=0.5,
                                   image=img if crf is not None else None, crf=crf)
        cm_pseudo.update(pseudo, gt)
        cm_mars.update(map_biased(debias_label(pseudo, keep), "background"), gt)
    return cm_pseudo.compute(), cm_mars.compute()


def test_chosen_centroids_lie_on_objects(mars_run: dict) -> None:
    chosen, purity = mars_run["sel"].chosen, mars_run["purity"]
    assert (purity[chosen] > 0.5).mean() >= 0.8, purity[chosen]
    assert purity[chosen].mean() > purity[~chosen].mean() + 0.4


def test_mars_removes_the_bias(mars_run: dict) -> None:
    pseudo, mars = _scores(mars_run)
    assert pseudo["fp"] > 0.45 and 0.40 < pseudo["miou"] < 0.65, pseudo
    assert mars["fp"] < pseudo["fp"] - 0.2, (pseudo, mars)
    assert mars["miou"] > pseudo["miou"] + 0.15, (pseudo, mars)
    assert mars["fn"] < 0.1, mars


def test_mars_with_crf_still_beats_pseudo(mars_run: dict) -> None:
    pytest.importorskip("pydensecrf.densecrf")
    pseudo, mars = _scores(mars_run, crf={})
    assert mars["fp"] < pseudo["fp"] - 0.3, (pseudo, mars)
    assert mars["miou"] > pseudo["miou"] + 0.05, (pseudo, mars)


def test_colour_threshold_cannot_remove_the_bias(mars_run: dict) -> None:
    """Oracle baseline: per class the best (channel ∈ R, G, B, grey; threshold; direction) keep
    rule on the pseudo foreground, chosen with the GT. It must stay far below MARS."""
    C, samples = mars_run["C"], mars_run["samples"]

    def chans(img: np.ndarray) -> np.ndarray:
        x = img.astype(np.float32)
        return np.concatenate([x, x.mean(-1, keepdims=True)], -1)  # [H, W, 4]

    rules = {}
    for c in range(1, C + 1):
        x = np.concatenate([chans(img)[p == c] for img, _, p, _ in samples.values()])
        y = np.concatenate([g[p == c] == c for _, _, p, g in samples.values()])
        best = (-1.0, (0, 0.0, 1))
        for ch in range(4):
            for t in np.quantile(x[:, ch], np.linspace(0.02, 0.98, 49)):
                for sgn in (1, -1):
                    keep = sgn * (x[:, ch] - t) > 0
                    tp = float((keep & y).sum())
                    iou = tp / (keep.sum() + y.sum() - tp)
                    best = max(best, (iou, (ch, float(t), sgn)), key=lambda b: b[0])
        rules[c] = best[1]
    cm = ConfusionMatrix(C + 1)
    for img, _, pseudo, gt in samples.values():
        x, out = chans(img), pseudo.copy()
        for c, (ch, t, sgn) in rules.items():
            out[(pseudo == c) & ~(sgn * (x[..., ch] - t) > 0)] = 254
        cm.update(map_biased(out, "background"), gt)
    colour = cm.compute()
    _, mars = _scores(mars_run)
    assert colour["miou"] < mars["miou"] - 0.15, (colour, mars)
    assert colour["fp"] > mars["fp"] + 0.1, (colour, mars)
