import math

import numpy as np
import pytest
import torch

from mars_ray.algo.metrics import ConfusionMatrix, map_biased, summarize


def _hand_cm() -> ConfusionMatrix:
    # rows target, cols pred:
    #        0  1  2
    #   0 [  5, 1, 0]
    #   1 [  2, 3, 0]
    #   2 [  0, 0, 0]   class 2 never appears: excluded from the means
    pairs = [(0, 0)] * 5 + [(0, 1)] + [(1, 0)] * 2 + [(1, 1)] * 3
    target = np.array([t for t, _ in pairs] + [255, 255])
    pred = np.array([p for _, p in pairs] + [2, 1])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    return cm


def test_hand_made_confusion():
    cm = _hand_cm()
    assert cm.mat.tolist() == [[5, 1, 0], [2, 3, 0], [0, 0, 0]]
    m = cm.compute()
    # U_0 = 7 + 6 - 5 = 8, U_1 = 4 + 5 - 3 = 6
    assert m["iou"][0] == pytest.approx(5 / 8) and m["iou"][1] == pytest.approx(3 / 6)
    assert math.isnan(m["iou"][2])
    assert m["miou"] == pytest.approx((5 / 8 + 3 / 6) / 2)
    assert m["fp"] == pytest.approx((4 - 3) / 6) and m["fn"] == pytest.approx((5 - 3) / 6)
    assert m["pixel_acc"] == pytest.approx(8 / 11)
    assert m["iou"][1] + m["fp_per_class"][1] + m["fn_per_class"][1] == pytest.approx(1)


def test_merge_torch_and_errors():
    a, b = _hand_cm(), ConfusionMatrix(3)
    b.update(torch.tensor([[2, 2]]), torch.tensor([[2, 0]]))
    assert a.merge(b).mat[2, 2] == 1 and a.mat[0, 2] == 1
    with pytest.raises(ValueError):
        a.update(np.array([3]), np.array([0]))
    with pytest.raises(ValueError, match="map_biased"):
        a.update(np.array([0]), np.array([254]))
    with pytest.raises(ValueError):
        a.update(np.array([0, 1]), np.array([0]))
    with pytest.raises(ValueError):
        a.merge(ConfusionMatrix(4))


def test_map_biased_and_ignore_pred():
    lab = np.array([0, 254, 3, 255], dtype=np.uint8)
    assert map_biased(lab).tolist() == [0, 0, 3, 255]
    assert map_biased(lab, "ignore").tolist() == [0, 255, 3, 255]
    assert lab[1] == 254
    with pytest.raises(ValueError):
        map_biased(lab, "drop")
    cm = ConfusionMatrix(4)
    cm.update(map_biased(lab, "ignore"), np.array([0, 2, 3, 1]))  # the biased pixel is excluded
    assert cm.mat.sum() == 2


def test_summarize_json_ready():
    s = summarize(_hand_cm(), ["background", "cat", "dog"])
    assert s["miou"] == pytest.approx((5 / 8 + 3 / 6) / 2)
    assert s["per_class"]["dog"] == {"iou": None, "fp": None, "fn": None}
    assert s["per_class"]["cat"]["fn"] == pytest.approx(2 / 6)
    with pytest.raises(ValueError):
        summarize(_hand_cm(), ["background", "cat"])


def test_pred_ignore_conventions_by_hand():
    """255 in a prediction: skipped (ours) or counted as background (IRN's convention)."""
    import numpy as np
    import pytest

    from mars_ray.algo.metrics import ConfusionMatrix, map_pred_ignore

    target = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 255, 1, 255]])
    ign, bg = ConfusionMatrix(2), ConfusionMatrix(2)
    ign.update(map_pred_ignore(pred, "ignore"), target)
    bg.update(map_pred_ignore(pred, "background"), target)
    assert ign.compute()["miou"] == pytest.approx(1.0)  # both 255 pixels skipped
    # background: bg TP 2, P 3, T 2 → IoU 2/3; class 1: TP 1, P 1, T 2 → 1/2
    assert bg.compute()["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert (pred == np.array([[0, 255, 1, 255]])).all()  # input untouched
    with pytest.raises(ValueError, match="pred-ignore"):
        map_pred_ignore(pred, "zero")


def test_centroid_gt_iou_against_a_loop_and_paper_ratio():
    import numpy as np
    import pytest

    from mars_ray.algo.metrics import centroid_gt_iou, target_centroid_ratio

    rng = np.random.default_rng(0)
    assignment = rng.integers(-1, 4, (12, 9))
    class_ids = np.array([1, 1, 2, 3])
    gt = rng.integers(0, 4, (12, 9))
    gt[0, :4] = 255
    got = centroid_gt_iou(assignment, class_ids, gt)
    for r, c in enumerate(class_ids):
        valid = gt != 255
        a, g = (assignment == r) & valid, (gt == c) & valid
        want = (a & g).sum() / max((a | g).sum(), 1)
        assert got[r] == pytest.approx(want, abs=1e-6)
    by_hand = target_centroid_ratio(np.array([0.5, 0.31, 0.3, 0.05, 0.2, np.nan]))
    assert by_hand == {"target": 2, "biased": 1, "n": 5, "target_ratio": 0.4, "biased_ratio": 0.2}
    assert target_centroid_ratio(np.array([]))["target_ratio"] is None
    with pytest.raises(ValueError):
        centroid_gt_iou(assignment, class_ids, gt[:, :3])
