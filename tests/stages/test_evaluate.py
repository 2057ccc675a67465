"""Stage ``evaluate`` on a local Ray: multi-scale + flip + CRF predictions, metrics as evaluate-labels gives them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mars_ray import config as C
from mars_ray.cli import main
from mars_ray.data.voc import VOCDataset
from mars_ray.models.deeplab import save_segmenter_checkpoint
from mars_ray.models.registry import SEGMENTERS
from mars_ray.stages import evaluate, evaluate_labels

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]


def _checkpoint(path: Path, num_classes: int, classes: list[str] | None = None) -> Path:
    torch.manual_seed(0)
    model = SEGMENTERS.get("deeplab_tiny", num_classes=num_classes)
    with torch.no_grad():  # sharp random logits, so that predictions vary over the image
        model.classifier.weight.mul_(200.0)
    return save_segmenter_checkpoint(path, model, "deeplab_tiny", {"num_classes": num_classes},
                                     extra={"classes": classes} if classes else None)


def test_metrics_equal_evaluate_labels_on_the_written_predictions(tiny_data: Path, ray_local, tmp_path: Path):
    ds = VOCDataset(tiny_data)
    ckpt = _checkpoint(tmp_path / "model.pt", ds.num_classes + 1, ds.classes)
    run = tmp_path / "run"
    cfg = C.build(overrides={"data.root": str(tiny_data), "evaluate.checkpoint": str(ckpt),
                             "evaluate.scales": "0.75,1.0,1.25", "evaluate.flip": True, "evaluate.crf": True,
                             "evaluate.num_actors": 1, "evaluate.batch_size": 2})
    out = evaluate.run(cfg, run)
    assert out == run / "evaluate"
    metrics = json.loads((out / "metrics.json").read_text())
    preds = sorted(p.stem for p in (out / "pred").glob("*.png"))
    assert preds == sorted(ds.ids("val"))
    ref = evaluate_labels.evaluate(tiny_data, out / "pred", "val", ray_cfg=cfg.ray)
    for key in ("miou", "fp", "fn", "pixel_acc", "per_class"):
        assert metrics[key] == ref[key], key  # the same integer counts → the same floats
    assert len({m["iou"] for m in metrics["per_class"].values()}) > 1
    assert metrics["scales"] == [0.75, 1.0, 1.25] and metrics["flip"] and metrics["crf"]
    assert metrics["crf_kwargs"] == CONVENTIONAL_CRF
    assert (out / "table.txt").read_text().strip() == evaluate_labels.format_table(ref)
    # rerun with the same inputs: skipped
    mtime = (out / "metrics.json").stat().st_mtime_ns
    evaluate.run(cfg, run)
    assert (out / "metrics.json").stat().st_mtime_ns == mtime


CONVENTIONAL_CRF = {"iters": 10, "gauss_sxy": 1.0, "gauss_compat": 3.0,
                    "bilateral_sxy": 67.0, "bilateral_srgb": 3.0, "bilateral_compat": 4.0}
"""DeepLab's CRF (bilateral weight 4, sxy 67, srgb 3; Gaussian weight 3, sxy 1; 10 iterations):
the paper's "CRF with conventional settings", as the authors' earlier code sets it."""


def test_the_evaluation_crf_is_the_conventional_one(tiny_data: Path, tmp_path: Path, monkeypatch):
    import numpy as np

    import mars_ray.algo.crf as crf_module

    assert evaluate.crf_kwargs(C.build(overrides={"evaluate.crf": True})) == CONVENTIONAL_CRF
    assert evaluate.crf_kwargs(C.Config()) is None  # off by default (CPU-sized); the job files turn it on
    # what reaches dense_crf in an evaluation actor
    seen: list[dict] = []
    real = crf_module.dense_crf
    monkeypatch.setattr(crf_module, "dense_crf", lambda image, probs, **kw: seen.append(kw) or real(image, probs, **kw))
    ds = VOCDataset(tiny_data)
    cfg = C.build(overrides={"data.root": str(tiny_data), "evaluate.crf": True})
    (tmp_path / "pred").mkdir()
    actor = evaluate.PredictImages(checkpoint=str(_checkpoint(tmp_path / "m.pt", 5, ds.classes)), dataset=ds.spec(),
                                   out_dir=str(tmp_path / "pred"), num_classes=5, crf=evaluate.crf_kwargs(cfg),
                                   with_gt=False)
    actor({"image_id": np.array(["val_0000"])})
    assert seen == [CONVENTIONAL_CRF]
    # the paper's protocol in both job files: multi-scale + flip + the conventional CRF
    for job in ("voc.yaml", "coco.yaml"):
        e = C.build(Path(__file__).resolve().parents[2] / "jobs" / job).evaluate
        assert e.crf and e.flip and len(e.scales) == 5 and e.crf_kwargs() == CONVENTIONAL_CRF, job


def test_checkpoint_of_another_class_count_is_one_clear_line(tiny_data: Path, ray_local, tmp_path: Path, capsys):
    ckpt = _checkpoint(tmp_path / "three.pt", 3)
    rc = main(["evaluate", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--checkpoint", str(ckpt),
               "--split", "val"])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "num_classes=3" in err
    assert not (tmp_path / "run" / "evaluate").exists()
