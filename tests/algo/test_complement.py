import math

import pytest
import torch
from torch import nn

from mars_ray.algo.complement import certain_mask, complement_labels, ema_update, weighted_cross_entropy


def test_complement_and_certain_mask_by_hand():
    y_db = torch.tensor([[[0, 254], [255, 2]]])
    pred = torch.tensor([[[1, 1], [1, 1]]])
    assert complement_labels(y_db, pred).tolist() == [[[0, 1], [255, 2]]]
    probs = torch.zeros(1, 3, 2, 2)
    probs[0, :, 0, 1] = torch.tensor([0.5, 0.2, 0.3])  # the biased pixel: max fg prob 0.3
    probs[0, :, 0, 0] = torch.tensor([0.1, 0.8, 0.1])
    w = certain_mask(y_db, probs)
    assert w.dtype.is_floating_point
    assert torch.allclose(w, torch.tensor([[[1.0, 0.3], [1.0, 1.0]]]))
    with pytest.raises(ValueError):
        certain_mask(y_db, probs[:, :, :1])


def test_eq7_hand_computed():
    logits = torch.zeros(1, 2, 1, 3, requires_grad=True)  # uniform: CE = log 2 everywhere
    target = torch.tensor([[[0, 1, 255]]])
    weight = torch.tensor([[[1.0, 0.3, 0.9]]])
    loss = weighted_cross_entropy(logits, target, weight)
    assert loss.item() == pytest.approx((1.0 + 0.3) * math.log(2) / 2)  # 2 valid pixels
    loss.backward()
    assert logits.grad[0, :, 0, 2].abs().sum() == 0  # ignored pixel gets no gradient


def test_eq7_pipeline_254_weighted_by_teacher():
    y_db = torch.tensor([[[1, 254, 255]]])
    probs = torch.tensor([[[0.2, 0.4, 0.5], [0.8, 0.6, 0.5]]]).reshape(1, 2, 1, 3)
    target = complement_labels(y_db, probs.argmax(1))
    w = certain_mask(y_db, probs)
    logits = torch.log(torch.tensor([[[0.25, 0.5, 0.5], [0.75, 0.5, 0.5]]])).reshape(1, 2, 1, 3)
    loss = weighted_cross_entropy(logits, target, w)
    want = (-math.log(0.75) * 1.0 + -math.log(0.5) * 0.6) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_eq7_no_valid_pixel_and_errors():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = weighted_cross_entropy(logits, torch.full((1, 2, 2), 255), torch.ones(1, 2, 2))
    assert loss.item() == 0 and loss.requires_grad
    with pytest.raises(ValueError, match="complement"):
        weighted_cross_entropy(logits, torch.full((1, 2, 2), 254), torch.ones(1, 2, 2))
    with pytest.raises(ValueError):
        weighted_cross_entropy(logits, torch.full((1, 2, 2), 3), torch.ones(1, 2, 2))


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))


def test_ema_closed_form():
    torch.manual_seed(0)
    teacher, student = _net(), _net()
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        student[1].running_mean.fill_(2.0)
        student[1].num_batches_tracked.fill_(7)
    m, n = 0.9, 5
    for _ in range(n):
        ema_update(teacher, student, m)
    s = student.state_dict()
    for k, v in teacher.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, m**n * t0[k] + (1 - m**n) * s[k], atol=1e-6), k
        else:
            assert torch.equal(v, s[k]), k
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError):
            ema_update(teacher, student, bad)


def test_ema_is_bit_identical_to_the_per_tensor_update():
    """The batched (foreach) update computes exactly ``t.mul_(m).add_(s, alpha=1 - m)`` per tensor."""
    torch.manual_seed(1)
    teacher, student = _net(), _net()
    reference = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        student[1].running_var.uniform_(0.5, 2.0)
    for _ in range(3):
        ema_update(teacher, student, 0.999)
        for k, s in student.state_dict().items():
            if reference[k].is_floating_point():
                reference[k].mul_(0.999).add_(s, alpha=1.0 - 0.999)
            else:
                reference[k].copy_(s)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_absent_class_never_filled_nor_weighted():
    """A teacher confident in a class the image lacks: W is the max over the image's classes only."""
    from mars_ray.algo.complement import image_class_mask, restrict_probs

    y_db = torch.tensor([[[254, 254, 1]]])  # two biased pixels, one kept class-1 pixel
    probs = torch.zeros(1, 4, 1, 3)
    probs[0, :, 0, 0] = torch.tensor([0.1, 0.1, 0.8, 0.0])  # confident in class 2 (absent)
    probs[0, :, 0, 1] = torch.tensor([0.2, 0.3, 0.1, 0.4])  # class 3 (absent) is the max
    probs[0, :, 0, 2] = torch.tensor([0.1, 0.9, 0.0, 0.0])
    mask = image_class_mask([[1]], num_classes=4)
    assert mask.tolist() == [[True, True, False, False]]
    w = certain_mask(y_db, probs, mask)
    assert torch.allclose(w, torch.tensor([[[0.1, 0.3, 1.0]]]))  # max over C_I = {1}, raw probs
    w_all = certain_mask(y_db, probs)  # without image labels: all fg classes
    assert torch.allclose(w_all, torch.tensor([[[0.8, 0.4, 1.0]]]))
    restricted = restrict_probs(probs, mask)
    assert torch.allclose(restricted.sum(1), torch.ones(1, 1, 3))
    assert restricted[:, 2:].abs().sum() == 0
    fill = complement_labels(y_db, restricted.argmax(1))
    assert set(fill.unique().tolist()) <= {0, 1}
    assert fill.tolist() == [[[0, 1, 1]]]  # pixel 0: bg 0.1 vs class-1 0.1 → tie to bg; pixel 1: class 1


def test_restrict_probs_falls_back_to_background_and_checks_mask():
    from mars_ray.algo.complement import image_class_mask, restrict_probs

    probs = torch.zeros(1, 3, 1, 1)
    probs[0, 2] = 1.0  # all mass on an absent class
    out = restrict_probs(probs, image_class_mask([[1]], 3))
    assert out[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="class_mask"):
        restrict_probs(probs, torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="outside"):
        image_class_mask([[3]], 3)
