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
