"""In-process MARS (no Ray) on small generated variants: the adaptive default must improve the pseudo labels.

Issue 9's acceptance tests: the default extractor improves debiased mIoU over the pseudo labels on
at least three small ``make_biased_dataset`` variants, and the old ``texture`` default fails on at
least one of them (the colour-cue variant: its features weight colour by 0.1). The chain is
``mars_ray.quality.debias_in_process`` with the pipeline's defaults (K_fg = K_bg = 2, α = 0.4,
threshold 0.5, the debias stage's dense CRF), the adaptive statistics fitted on the split itself.
The separation score is high there and low on features that carry no signal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mars_ray.algo.separation import SEPARATION_THRESHOLD
from mars_ray.config import DebiasConfig
from mars_ray.data.label_io import read_image
from mars_ray.data.synthetic import make_biased_dataset
from mars_ray.data.voc import VOCDataset
from mars_ray.models.adaptive import AdaptiveExtractor, fit_adaptive_stats
from mars_ray.models.handcrafted import build_texture_extractor
from mars_ray.quality import InProcessResult, LabelQuality, debias_in_process

pytest.importorskip("pydensecrf.densecrf")

VARIANTS = {
    "colour": dict(cue="colour", size=80, seed=31),
    "both-nonsquare-jpg": dict(cue="both", height=56, width=88, image_format="jpg", seed=32),
    "texture-low-share": dict(size=64, biased_share=0.6, bias_kind="mixed", seed=33),
}
CRF = DebiasConfig().crf_kwargs()


def _source(model: torch.nn.Module):
    @torch.no_grad()
    def f(_: str, image: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0)[0].numpy()

    return f


def _adaptive(root: Path) -> torch.nn.Module:
    ds = VOCDataset(root)
    return AdaptiveExtractor(fit_adaptive_stats(read_image(ds.image_path(i)) for i in ds.ids("train"))).eval()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, InProcessResult]]:
    out: dict[str, dict[str, InProcessResult]] = {}
    for name, kw in VARIANTS.items():
        root = make_biased_dataset(tmp_path_factory.mktemp(name) / "d", n_train=40, n_val=1, **kw)
        out[name] = {
            "adaptive": debias_in_process(root, _source(_adaptive(root)), crf=CRF),
            "texture": debias_in_process(root, _source(build_texture_extractor()), crf=CRF),
        }
    return out


# (variant, extractor, improves): the adaptive default must improve every variant; the old texture default
# is checked on the same variants, and on the colour cue it must NOT improve (the gap the default closes)
CASES = [(v, "adaptive", True) for v in VARIANTS] + [("colour", "texture", False)]


@pytest.mark.slow  # ~1 min: three 40-image variants, two extractors, with the CRF
@pytest.mark.parametrize("name, extractor, improves", CASES)
def test_default_extractor_improves_the_pseudo_labels(results: dict, name: str, extractor: str, improves: bool) -> None:
    q = results[name][extractor].quality
    gain = q["debiased"]["miou"] - q["pseudo"]["miou"]
    if improves:
        assert gain > 0.08, q
        assert q["removal_recall"] > 0.7 and q["retention"] > 0.6, q
        assert q["debiased"]["fp"] < q["pseudo"]["fp"] - 0.2, q
    else:
        assert gain < 0.03, q


@pytest.mark.parametrize("extractor, improves", [("adaptive", True), ("texture", False)])
def test_small_colour_variant(tmp_path: Path, extractor: str, improves: bool) -> None:
    """The fast subset (~5 s): 40 images at 80 px where colour is the cue, with the default CRF. Seeds 35-39
    gave the adaptive default +23 to +44 points and texture -3 to +3 (measured when this test was written)."""
    root = make_biased_dataset(tmp_path / "d", n_train=40, n_val=1, size=80, cue="colour", seed=35)
    model = _adaptive(root) if extractor == "adaptive" else build_texture_extractor()
    q = debias_in_process(root, _source(model), crf=CRF).quality
    gain = q["debiased"]["miou"] - q["pseudo"]["miou"]
    assert (gain > 0.08) if improves else (gain < 0.05), q


@pytest.mark.slow
def test_texture_default_fails_on_the_colour_cue(results: dict) -> None:
    """Documents the gap the adaptive default closes: ``texture`` does not improve the colour variant."""
    tex, ada = results["colour"]["texture"].quality, results["colour"]["adaptive"].quality
    assert tex["debiased"]["miou"] < tex["pseudo"]["miou"] + 0.03, tex
    assert ada["debiased"]["miou"] > tex["debiased"]["miou"] + 0.15, (ada, tex)


@pytest.mark.slow
def test_separation_high_with_adaptive_low_without_signal(results: dict, tmp_path: Path) -> None:
    scores = results["both-nonsquare-jpg"]["adaptive"].separation
    judged = [s["score"] for s in scores.values() if np.isfinite(s["score"])]
    assert len(judged) >= 3 and min(judged) > SEPARATION_THRESHOLD, scores
    root = make_biased_dataset(tmp_path / "d", n_train=16, n_val=1, size=48, seed=34)
    rng = np.random.default_rng(0)
    noise = debias_in_process(root, lambda _, im: rng.normal(size=(16, *im.shape[:2])).astype(np.float32))
    judged = [s["score"] for s in noise.separation.values() if np.isfinite(s["score"])]
    assert len(judged) >= 3 and max(judged) < SEPARATION_THRESHOLD, noise.separation


def test_label_quality_counts() -> None:
    gt = np.array([[0, 0, 1, 1]], np.uint8)
    pseudo = np.array([[1, 1, 1, 1]], np.uint8)
    debiased = np.array([[254, 1, 1, 254]], np.uint8)
    q = LabelQuality(1)
    q.update(pseudo, debiased, gt)
    r = q.compute()
    assert r["removal_recall"] == 0.5 and r["retention"] == 0.5
    assert r["pseudo"]["miou"] == pytest.approx((0 + 0.5) / 2) and r["debiased"]["miou"] == pytest.approx((1 / 3 + 1 / 3) / 2)
    with pytest.raises(ValueError, match="differ"):
        q.update(pseudo, debiased[:, :2], gt)
