"""CAM classifier: registry entries, loss, multi-scale CAMs that find the object, CAM → label."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from mars_ray.models.cam import CamClassifier, cam_loss, cams_to_label, compute_cams
from mars_ray.models import vit  # noqa: F401  (registers vit_tiny_test)
from mars_ray.models.registry import CLASSIFIERS

TINY = {"widths": (8, 16, 16, 16), "out_dim": 16}


@pytest.mark.parametrize("name", ["cam", "cam_small"])
def test_registry_entries(name: str) -> None:
    model = CLASSIFIERS.get(name, num_classes=3, **TINY)
    assert isinstance(model, CamClassifier)
    assert model(torch.rand(2, 3, 32, 40)).shape == (2, 3)
    assert model.classifier.bias is None
    assert set(cam_loss(model, torch.rand(2, 3, 32, 32), torch.tensor([[1, 0, 1], [0, 1, 0]]))) == {"cls"}
    with pytest.raises(ValueError, match="targets"):
        cam_loss(model, torch.rand(2, 3, 32, 32), torch.zeros(2, 4))


def test_generic_builder_takes_any_backbone() -> None:
    model = CLASSIFIERS.get("cam", num_classes=2, backbone="vit_tiny_test")
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 2)


def _squares(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grey images with a red (class 1) and/or a green (class 2) 12 px square; labels, masks."""
    g = torch.Generator().manual_seed(seed)
    images = torch.full((n, 3, size, size), 0.5)
    targets = torch.zeros(n, 2)
    masks = torch.zeros(n, 2, size, size, dtype=torch.bool)
    for i in range(n):
        present = [i % 3 != 1, i % 3 != 0]  # class 1 only, class 2 only, both
        for c, colour in enumerate(([1.0, 0.1, 0.1], [0.1, 1.0, 0.1])):
            if not present[c]:
                continue
            y, x = torch.randint(0, size - 12, (2,), generator=g).tolist()
            if all(present):  # both: class 1 on the left, class 2 on the right, no overlap
                x = torch.randint(0, size // 2 - 12 + 1, (1,), generator=g).item() + c * (size // 2)
            images[i, :, y:y + 12, x:x + 12] = torch.tensor(colour).view(3, 1, 1)
            masks[i, c, y:y + 12, x:x + 12] = True
            targets[i, c] = 1
    return images, targets, masks


def test_cams_highlight_the_object() -> None:
    torch.manual_seed(0)
    model = CLASSIFIERS.get("cam_small", num_classes=2, **TINY)
    images, targets, _ = _squares(24)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(25):
        idx = torch.arange(8) + 8 * (step % 3)
        loss = sum(cam_loss(model, images[idx], targets[idx]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    test_images, test_targets, test_masks = _squares(6, seed=1)
    for img, tgt, mask in zip(test_images, test_targets, test_masks):
        classes = [c + 1 for c in range(2) if tgt[c]]
        cams = compute_cams(model, img, classes, scales=(1.0, 1.5))
        assert cams.shape == (len(classes), 32, 32)
        assert cams.min() >= 0 and cams.max() <= 1
        for k, c in enumerate(classes):
            inside, outside = cams[k][mask[c - 1]].mean(), cams[k][~mask[c - 1]].mean()
            assert inside > outside + 0.2, (c, inside.item(), outside.item())
        label = cams_to_label(cams, classes, bg_threshold=0.3)
        for c in classes:
            hit = (label[mask[c - 1].numpy()] == c).mean()
            assert hit > 0.5, (c, hit)
    assert model.training  # compute_cams restores the mode


def test_compute_cams_rejects_bad_input() -> None:
    model = CLASSIFIERS.get("cam_small", num_classes=2, **TINY)
    with pytest.raises(ValueError, match="outside 1..2"):
        compute_cams(model, torch.rand(3, 16, 16), [3])
    with pytest.raises(ValueError, match="3 x H x W"):
        compute_cams(model, torch.rand(1, 3, 16, 16), [1])
    assert compute_cams(model, torch.rand(3, 16, 16), []).shape == (0, 16, 16)


def test_cams_to_label_uses_only_given_classes() -> None:
    rng = np.random.default_rng(0)
    cams = rng.random((3, 20, 24)).astype(np.float32)
    label = cams_to_label(cams, [4, 7, 15], bg_threshold=0.5)
    assert label.dtype == np.uint8 and label.shape == (20, 24)
    assert set(np.unique(label)) <= {0, 4, 7, 15} and {0, 4, 7, 15} <= set(np.unique(label))
    assert (cams_to_label(np.zeros((2, 5, 5)), [1, 2]) == 0).all()
    assert (cams_to_label(torch.ones(1, 5, 5), [9]) == 9).all()
    with pytest.raises(ValueError, match="len\\(classes\\)"):
        cams_to_label(cams, [1, 2])


def test_cams_to_label_crf_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {}

    def fake_dense_crf(image: np.ndarray, probs: np.ndarray, **kw: object) -> np.ndarray:
        calls.update(image=image.shape, sums=probs.sum(0), kw=kw)
        return probs[::-1].copy()  # swap bg / fg to prove the result is used

    fake = types.ModuleType("mars_ray.algo.crf")
    fake.dense_crf = fake_dense_crf  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mars_ray.algo.crf", fake)
    cams = np.zeros((1, 4, 6), dtype=np.float32)
    image = np.zeros((4, 6, 3), dtype=np.uint8)
    label = cams_to_label(cams, [5], image=image, crf={"iters": 3})
    assert calls["image"] == (4, 6, 3) and calls["kw"] == {"iters": 3}
    np.testing.assert_allclose(calls["sums"], 1.0, rtol=1e-5)
    assert (label == 5).all()
    with pytest.raises(ValueError, match="image"):
        cams_to_label(cams, [5], crf={})
