import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mars_ray.algo.complement import complement_labels, ema_update
from mars_ray.config import TrainConfig
from mars_ray.engine import (
    SegAugment,
    baseline_step,
    build_sgd,
    complement_step,
    evaluate,
    make_ema_teacher,
    poly_lr_lambda,
    predict_labels,
    predict_probs,
    train_one_epoch,
)
from mars_ray.labels import BIASED
from mars_ray.models.deeplab import deeplab_tiny



class FixedLogits(nn.Module):
    """Ignores the image content; returns a learnable (or fixed) ``[B,K,H,W]`` logit map."""

    def __init__(self, logits: torch.Tensor, learnable: bool = True) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone(), requires_grad=learnable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1, -1, -1)


class OracleFromRed(nn.Module):
    """Logits that one-hot the class written in the red channel (class = round(red * 255 / 40))."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.k = num_classes
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = (x[:, 0] * 255 / 40).round().long().clamp(0, self.k - 1)
        return F.one_hot(cls, self.k).permute(0, 3, 1, 2).float() * 10 + self.dummy


# ---------------------------------------------------------------------------------- schedule / optimiser


def test_poly_lr_lambda() -> None:
    f = poly_lr_lambda(100, power=0.9)
    assert f(0) == 1.0
    assert f(50) == pytest.approx(0.5**0.9)
    assert f(100) == 0.0 and f(150) == 0.0
    with pytest.raises(ValueError, match="max_iters"):
        poly_lr_lambda(0)


def test_build_sgd_keeps_group_lrs() -> None:
    model = deeplab_tiny(num_classes=3)
    opt = build_sgd(model.param_groups(0.01), lr=0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.01, pytest.approx(0.1)]
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["weight_decay"] == 4e-5


# ---------------------------------------------------------------------------------- train_one_epoch


def _toy_problem():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    batches = [{"x": x[i : i + 8], "y": y[i : i + 8]} for i in range(0, 64, 8)]
    model = nn.Linear(4, 2)

    def step(batch):
        logits = model(batch["x"])
        return {
            "ce": F.cross_entropy(logits, batch["y"]),
            "l2": 1e-3 * model.weight.pow(2).sum(),
            "m_acc": (logits.argmax(1) == batch["y"]).float().mean(),
        }

    return model, batches, step


def test_train_one_epoch_reduces_loss_and_calls_hooks() -> None:
    model, batches, step = _toy_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lr_lambda(3 * len(batches)))
    calls: list[int] = []
    first = train_one_epoch(step, batches, opt, scheduler=sched, after_step=calls.append, log_every=3)
    for _ in range(2):
        last = train_one_epoch(step, batches, opt, scheduler=sched)
    assert calls == list(range(len(batches)))
    assert last["loss"] < 0.7 * first["loss"]
    assert first["steps"] == len(batches) and first["images_per_s"] > 0
    # metrics (m_ prefix) are reported without the prefix and not summed into the loss
    assert set(first) == {"loss", "ce", "l2", "acc", "steps", "images_per_s"}
    assert first["loss"] == pytest.approx(first["ce"] + first["l2"])
    assert last["acc"] > 0.9
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # scheduler stepped per iteration


def test_train_one_epoch_max_steps_and_errors() -> None:
    model, batches, step = _toy_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert train_one_epoch(step, batches, opt, max_steps=3)["steps"] == 3
    with pytest.raises(FloatingPointError, match="step 0"):
        train_one_epoch(lambda b: {"ce": model(b["x"]).sum() * float("nan")}, batches, opt)
    with pytest.raises(ValueError, match="no loss term"):
        train_one_epoch(lambda b: {"m_acc": 1.0}, batches, opt)
    with pytest.raises(ValueError, match="collide"):
        train_one_epoch(lambda b: {"acc": model(b["x"]).sum(), "m_acc": 1.0}, batches, opt)
    empty = train_one_epoch(step, [], opt)
    assert empty["steps"] == 0 and math.isnan(empty["loss"])


def test_train_one_epoch_with_grad_scaler_runs_under_autocast() -> None:
    model, batches, step = _toy_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    seen: list[torch.dtype] = []

    def amp_step(batch):
        seen.append(model(batch["x"]).dtype)
        return step(batch)

    out = train_one_epoch(amp_step, batches, opt, scaler=torch.amp.GradScaler("cpu"))
    assert out["steps"] == len(batches) and math.isfinite(out["loss"])
    assert seen[0] == torch.bfloat16  # CPU autocast


def test_train_one_epoch_amp_dtype_without_scaler() -> None:
    """bf16 autocast needs no grad scaler: ``amp_dtype`` alone turns autocast on."""
    model, batches, step = _toy_problem()
    opt = build_sgd(model.parameters(), lr=0.5, fused=True)
    seen: list[torch.dtype] = []

    def amp_step(batch):
        seen.append(model(batch["x"]).dtype)
        return step(batch)

    out = train_one_epoch(amp_step, batches, opt, amp_dtype=torch.bfloat16)
    assert out["steps"] == len(batches) and math.isfinite(out["loss"])
    assert seen[0] == torch.bfloat16
    seen.clear()
    train_one_epoch(amp_step, batches[:1], opt)
    assert seen[0] == torch.float32  # no autocast without amp_dtype or a scaler


# ---------------------------------------------------------------------------------- prediction / evaluation


def test_predict_probs_flip_and_scales() -> None:
    torch.manual_seed(0)
    sym = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():  # a left-right symmetric kernel makes the conv flip-equivariant
        sym.weight.copy_((sym.weight + sym.weight.flip(-1)) / 2)
    x = torch.rand(2, 3, 8, 10)
    plain = predict_probs(sym, x)
    assert plain.shape == (2, 4, 8, 10)
    assert torch.allclose(plain.sum(1), torch.ones(2, 8, 10))
    assert torch.allclose(predict_probs(sym, x, flip=True), plain, atol=1e-6)

    asym = nn.Conv2d(3, 4, 3, padding=1)
    manual = (asym(x).softmax(1) + asym(x.flip(-1)).flip(-1).softmax(1)) / 2
    assert torch.allclose(predict_probs(asym, x, flip=True), manual, atol=1e-6)

    pointwise = nn.Conv2d(3, 4, 1)  # on a constant image every scale gives the same probabilities
    const = torch.full((1, 3, 8, 8), 0.3)
    assert torch.allclose(predict_probs(pointwise, const, scales=(0.5, 1.0, 1.5)), predict_probs(pointwise, const))
    with pytest.raises(ValueError, match="scales"):
        predict_probs(pointwise, const, scales=())


def _eval_batches():
    label = torch.tensor([[[0, 1, 2, 255], [2, 2, 1, 0]]] * 2)  # [2, 2, 4]
    red = label.clamp(max=3).float() * 40 / 255
    image = torch.stack([red, torch.zeros_like(red), torch.zeros_like(red)], dim=1)
    wrong = label.clone()
    wrong[1, 0, 0] = 1  # one pixel where the oracle (reading the image) disagrees with the label
    return [{"image": image, "label": wrong, "id": ["a", "b"]}]


def test_evaluate_and_predict_labels() -> None:
    model = OracleFromRed(3).train()
    cm = evaluate(model, _eval_batches(), 3)
    assert model.training  # mode restored
    assert cm.mat.sum() == 14  # 16 pixels, 2 ignored
    assert cm.mat[1, 0] == 1 and np.trace(cm.mat) == 13
    preds = dict(predict_labels(model, _eval_batches(), flip=True))
    assert list(preds) == ["a", "b"]
    assert preds["a"].dtype == np.uint8 and preds["a"].tolist() == [[0, 1, 2, 2], [2, 2, 1, 0]]
    with pytest.raises(ValueError, match="num_classes"):
        evaluate(model, _eval_batches(), 4)


def test_evaluate_with_crf_keeps_a_confident_prediction() -> None:
    cm = evaluate(OracleFromRed(3), _eval_batches(), 3, crf={"iters": 2, "gauss_compat": 0, "bilateral_compat": 0})
    assert np.trace(cm.mat) == 13


# ---------------------------------------------------------------------------------- complementing


def _complement_case():
    torch.manual_seed(0)
    k, h, w = 3, 3, 4
    teacher = FixedLogits(torch.randn(1, k, h, w) * 2, learnable=False)
    student = FixedLogits(torch.randn(1, k, h, w))
    y_db = torch.tensor([[[0, 254, 1, 255], [254, 2, 254, 0], [255, 1, 254, 254]]])
    image = torch.rand(1, 3, h, w)
    batch = {"image": image, "image_uint8": (image * 255).byte().permute(0, 2, 3, 1), "label": y_db}
    return teacher, student, batch, k


def _manual_wce(teacher, student, y_db, use_w=True):
    with torch.no_grad():
        p_t = teacher.logits.softmax(1)
    y_co = torch.where(y_db == 254, p_t.argmax(1), y_db)
    w = torch.where(y_db == 254, p_t[:, 1:].amax(1), torch.ones_like(p_t[:, 0])) if use_w else torch.ones(y_db.shape)
    valid = y_db != 255
    ce = F.cross_entropy(student.logits, y_co.clamp(max=2), reduction="none")
    return (ce * w * valid).sum() / valid.sum(), y_co, w


def test_complement_step_matches_manual_eq6_eq7() -> None:
    teacher, student, batch, k = _complement_case()
    out = complement_step(student, teacher, batch, num_classes=k, crf=None)
    expected, _, w = _manual_wce(teacher, student, batch["label"])
    assert set(out) == {"wce", "m_biased_frac", "m_mean_w"}
    assert out["wce"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["m_biased_frac"] == pytest.approx(5 / 10)
    assert out["m_mean_w"] == pytest.approx(w[batch["label"] != 255].mean().item(), rel=1e-5)
    # the gradient flows to the student only, and the teacher stays frozen in eval mode
    out["wce"].backward()
    assert student.logits.grad is not None and teacher.logits.grad is None
    # gradient on a 255 pixel is zero; on a 254 pixel it pushes toward the teacher's argmax
    g = student.logits.grad[0]
    assert torch.all(g[:, 0, 3] == 0) and torch.all(g[:, 2, 0] == 0)
    t_arg = teacher.logits[0, :, 1, 0].argmax()
    assert g[t_arg, 1, 0] < 0


class CoarseOracle(nn.Module):
    """A segmenter that answers at stride 4, as DeepLabV3+'s decoder does, and calls a 4×4 cell object when
    any of it is ("red > 0.5"): the over-reach at boundaries the teacher showed (upsampled by ``predict_probs``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = F.max_pool2d((x[:, :1] > 0.5).float(), 4, ceil_mode=True)
        return 8.0 * torch.cat([1 - fg, fg], 1)


def test_multi_scale_fill_bleeds_less_into_removed_context() -> None:
    """Why train.complement_scales defaults to (1, 1.5, 2) + flip: a stride-4 teacher's single-scale fill spreads
    the object over the removed context next to it; the up-scaled inputs narrow that blur."""
    h = w = 32
    image = torch.zeros(1, 3, h, w)
    image[0, 0, 10:21, 9:22] = 1.0  # the object, off the 4-px grid
    obj = image[0, 0] > 0.5
    ring = F.max_pool2d(obj[None, None].float(), 9, stride=1, padding=4)[0, 0].bool() & ~obj
    y_db = torch.where(obj, torch.tensor(1), torch.tensor(0))[None]
    y_db[0][ring] = BIASED  # the context debiasing removed around the object (truly background)
    bled = {}
    shipped = TrainConfig()
    multi = dict(scales=shipped.complement_scales, flip=shipped.complement_flip)
    for name, kw in {"single": dict(scales=(1.0,)), "multi": multi}.items():
        fill = predict_probs(CoarseOracle(), image, **kw).argmax(1)
        bled[name] = int((complement_labels(y_db, fill)[0][ring] == 1).sum())
    assert bled["single"] > 0 and bled["multi"] <= 0.75 * bled["single"], bled


def test_complement_step_plain_ce_and_crf_identity() -> None:
    teacher, student, batch, k = _complement_case()
    out = complement_step(student, teacher, batch, num_classes=k, crf=None, use_wce=False)
    expected, _, _ = _manual_wce(teacher, student, batch["label"], use_w=False)
    assert set(out) == {"ce", "m_biased_frac", "m_mean_w"} and out["m_mean_w"] == pytest.approx(1.0)
    assert out["ce"].item() == pytest.approx(expected.item(), rel=1e-5)
    # a CRF whose pairwise weights are 0 returns the teacher's probabilities: same loss as without CRF
    plain = complement_step(student, teacher, batch, num_classes=k, crf=None)["wce"]
    identity = {"iters": 3, "gauss_compat": 0, "bilateral_compat": 0}
    assert complement_step(student, teacher, batch, num_classes=k, crf=identity)["wce"].item() == pytest.approx(
        plain.item(), rel=1e-5
    )
    with pytest.raises(ValueError, match="num_classes"):
        complement_step(student, teacher, batch, num_classes=k + 1, crf=None)


def test_complement_step_crf_in_a_process_pool_equals_in_process() -> None:
    """The teacher's CRF fill run by a pool of processes (``crf_map``) gives the same loss, with and
    without the image's class set (the restricted probabilities go to the pool)."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    crf = {"iters": 3}
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        for teacher, student, batch, k in (_complement_case(), _absent_class_case()):
            here = complement_step(student, teacher, batch, num_classes=k, crf=crf)
            there = complement_step(student, teacher, batch, num_classes=k, crf=crf, crf_map=pool.map)
            assert there["wce"].item() == here["wce"].item()
            assert there["m_mean_w"] == here["m_mean_w"]


def _absent_class_case(two_images: bool = False):
    """A teacher confident (p = 0.8) in class 3 everywhere; the image contains only class 1."""
    k, h, w = 4, 6, 8
    probs = torch.tensor([0.05, 0.10, 0.05, 0.80])  # bg, 1, 2, 3
    logits = probs.log()[None, :, None, None].expand(1, k, h, w).clone()
    logits[0, :, :, :2] = torch.tensor([0.70, 0.05, 0.05, 0.20]).log()[:, None, None]  # a bg-ish strip
    teacher = FixedLogits(logits, learnable=False)
    student = FixedLogits(torch.zeros(1, k, h, w))
    y_db = torch.full((1, h, w), 254)
    y_db[0, 0] = 0
    y_db[0, -1] = 255
    image = torch.rand(1, 3, h, w)
    mask = torch.tensor([[True, True, False, False]])  # background + class 1
    batch = {"image": image, "image_uint8": (image * 255).byte().permute(0, 2, 3, 1), "label": y_db,
             "class_mask": mask}
    return teacher, student, batch, k


@pytest.mark.parametrize("crf", [None, {"iters": 5}], ids=["no-crf", "crf"])
def test_complement_step_never_picks_a_class_absent_from_the_image(crf) -> None:
    """Eq 6 and the fill run over the image's classes: a teacher sure of absent class 3 fills class 1
    (or background where background beats class 1), and W = p_t(1), the max over C_I = {1}."""
    teacher, student, batch, k = _absent_class_case()
    out = complement_step(student, teacher, batch, num_classes=k, crf=crf)
    out["wce"].backward()
    g = student.logits.grad[0]  # CE gradient: negative on the filled class only
    biased = batch["label"][0] == 254
    filled = g.argmin(dim=0)[biased]
    assert set(filled.unique().tolist()) <= {0, 1} and 1 in filled.tolist()
    assert not bool((g[2:, biased] < 0).any())  # classes 2 and 3 are never the target
    # W equals the teacher's probability of class 1 (raw softmax): 0.10 in the body, 0.05 in the strip
    p1 = teacher.logits.softmax(1)[0, 1]
    labelled = batch["label"][0] != 255
    w = torch.where(biased, p1, torch.ones_like(p1))
    assert out["m_mean_w"] == pytest.approx(float(w[labelled].mean()), rel=1e-5)
    # without the class set (the image's classes unknown) the same teacher fills class 3 with W = 0.8
    student.logits.grad = None
    loose = complement_step(student, teacher, {k_: v for k_, v in batch.items() if k_ != "class_mask"},
                            num_classes=k, crf=crf)
    loose["wce"].backward()
    assert bool((student.logits.grad[0].argmin(dim=0)[biased] == 3).any())
    assert loose["m_mean_w"] > out["m_mean_w"] + 0.3


def test_complement_step_rejects_a_class_mask_of_the_wrong_shape() -> None:
    teacher, student, batch, k = _absent_class_case()
    with pytest.raises(ValueError, match="class_mask"):
        complement_step(student, teacher, dict(batch, class_mask=torch.ones(1, k + 1, dtype=torch.bool)),
                        num_classes=k, crf=None)


def test_predict_labels_with_class_mask_never_predicts_an_absent_class() -> None:
    teacher, _, batch, _ = _absent_class_case()
    (_, pred), = predict_labels(teacher, [dict(batch, id=["a"])], crf={"iters": 3})
    assert set(np.unique(pred).tolist()) <= {0, 1}
    (_, free), = predict_labels(teacher, [dict(batch, id=["a"], class_mask=None)])
    assert 3 in np.unique(free).tolist()


def test_baseline_step_treats_biased_as_ignore() -> None:
    _, student, batch, _ = _complement_case()
    y = batch["label"]
    expected = F.cross_entropy(student.logits, torch.where(y == 254, 255, y), ignore_index=255)
    assert baseline_step(student, batch)["ce"].item() == pytest.approx(expected.item())
    all_ignored = dict(batch, label=torch.full_like(y, 255))
    assert baseline_step(student, all_ignored)["ce"].item() == 0.0


def test_ema_teacher_training_loop_on_deeplab_tiny() -> None:
    torch.manual_seed(0)
    student = deeplab_tiny(num_classes=3).train()
    teacher = make_ema_teacher(student)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.classifier.weight.data_ptr() != student.classifier.weight.data_ptr()
    aug = SegAugment(32, scale_range=(0.75, 1.25), seed=0)
    rng = np.random.default_rng(0)
    items = []
    for _ in range(4):
        img = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
        lab = np.zeros((40, 40), np.uint8)
        lab[10:30, 10:30] = 1
        lab[15:25, 15:25] = 254
        items.append(aug(img, lab))
    batches = [{k: torch.stack([it[k] for it in items[i : i + 2]]) for k in items[0]} for i in (0, 2)]
    opt = build_sgd(student.param_groups(0.01), lr=0.01)
    before = teacher.classifier.weight.clone()
    out = train_one_epoch(
        lambda b: complement_step(student, teacher, b, num_classes=3, crf={"iters": 1}),
        batches,
        opt,
        after_step=lambda i: ema_update(teacher, student, 0.9),
    )
    assert out["steps"] == 2 and math.isfinite(out["wce"]) and 0 < out["biased_frac"] < 1
    assert not torch.equal(before, teacher.classifier.weight)


# ---------------------------------------------------------------------------------- augmentation

PALETTE = np.array([[0, 0, 0], [250, 0, 0], [0, 250, 0], [0, 0, 250]], np.uint8)


def _colour_coded(h: int = 40, w: int = 56):
    label = np.zeros((h, w), np.uint8)
    label[5:25, 4:30] = 1
    label[20:38, 30:52] = 2
    label[0:6, 40:56] = 3
    return PALETTE[label], label


def test_segaugment_keeps_image_and_label_aligned() -> None:
    image, label = _colour_coded()
    aug = SegAugment(32, scale_range=(0.5, 2.0), seed=0)
    for _ in range(10):
        out = aug(image, label)
        assert out["image"].shape == (3, 32, 32) and out["image"].dtype == torch.float32
        assert out["image_uint8"].shape == (32, 32, 3) and out["label"].dtype == torch.int64
        assert torch.allclose(out["image"], out["image_uint8"].permute(2, 0, 1).float() / 255)
        img, lab = out["image_uint8"].numpy().astype(int), out["label"].numpy()
        labelled = lab != 255
        # the nearest palette colour of each labelled pixel names its label (bilinear edges aside)
        nearest = np.abs(img[:, :, None, :] - PALETTE[None, None].astype(int)).sum(-1).argmin(-1)
        assert (nearest[labelled] == lab[labelled]).mean() > 0.95
        # padding: label 255 with the mean colour
        pad = ~labelled
        if pad.any():
            assert np.all(img[pad] == [124, 116, 104])


def test_segaugment_exact_without_scaling_and_flip_is_used() -> None:
    image, label = _colour_coded()
    aug = SegAugment((24, 20), scale_range=(1.0, 1.0), seed=1)
    flips = 0
    for _ in range(12):
        out = aug.numpy(image, label)
        assert out["image_uint8"].shape == (24, 20, 3) and out["label"].dtype == np.uint8
        assert np.array_equal(out["image_uint8"], PALETTE[out["label"]])
        # find the crop in the original (flipped or not) to detect flips
        lab = out["label"]
        found = any(np.array_equal(label[y : y + 24, x : x + 20], lab) for y in range(17) for x in range(37))
        flips += not found
    assert 0 < flips < 12
    a, b = SegAugment(16, seed=3), SegAugment(16, seed=3)
    assert np.array_equal(a.numpy(image, label)["label"], b.numpy(image, label)["label"])
    with pytest.raises(ValueError, match="label"):
        aug.numpy(image, label[:-1])
    with pytest.raises(ValueError, match="scale_range"):
        SegAugment(16, scale_range=(2.0, 1.0))


def test_teacher_fill_crf_is_scaled_to_the_whole_image_a_crop_came_from(monkeypatch) -> None:
    """``train.crf_reference_side``: the fill CRF's bilateral width follows the size of the image a
    training crop was cut from (``image_side``), or the image's own size for whole images."""
    import mars_ray.algo.crf as crf_mod

    seen: list[dict] = []

    def recording_crf(image, probs, **kwargs):
        seen.append(kwargs)
        return np.asarray(probs, np.float32)

    monkeypatch.setattr(crf_mod, "dense_crf", recording_crf)
    teacher, student, batch, k = _complement_case()
    spec = {"iters": 5, "bilateral_sxy": 50.0, "reference_side": 433.0}
    complement_step(student, teacher, {**batch, "image_side": torch.tensor([216.5])}, num_classes=k, crf=spec)
    assert seen[-1] == {"iters": 5, "bilateral_sxy": pytest.approx(25.0)}  # a crop of a 216.5 px image: half of 50
    complement_step(student, teacher, batch, num_classes=k, crf=spec)  # a whole 3×4 image
    assert seen[-1]["bilateral_sxy"] == pytest.approx(50.0 * math.sqrt(12) / 433.0)
    complement_step(student, teacher, batch, num_classes=k, crf={"iters": 5, "bilateral_sxy": 50.0})
    assert seen[-1] == {"iters": 5, "bilateral_sxy": 50.0}  # no reference side: pixels as given


def test_segaugment_reports_the_side_of_the_rescaled_image() -> None:
    image, label = _colour_coded(40, 56)
    assert SegAugment(16, scale_range=(1.0, 1.0), seed=0).numpy(image, label)["image_side"] == pytest.approx(
        math.sqrt(40 * 56))
    out = SegAugment(16, scale_range=(2.0, 2.0), seed=0)(image, label)
    assert float(out["image_side"]) == pytest.approx(math.sqrt(80 * 112))
