"""``train``, ``evaluate``, ``wsss`` (and ``uss``'s inputs) with the run folder and the dataset on S3 (moto).

The Ray workers and actors read the dataset and labels from the bucket and write their outputs
there; Ray Train keeps its checkpoints there too. Nothing may land on the local disk instead.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from mars_ray import config as C
from mars_ray import storage
from mars_ray.artifacts import current
from mars_ray.data.label_io import read_label
from mars_ray.data.voc import VOCDataset
from mars_ray.models.deeplab import load_segmenter_checkpoint
from mars_ray.stages import evaluate, train, uss, wsss
from mars_ray.storage import ObjectPath, upath

from tests.conftest import upload_tree

pytestmark = [pytest.mark.timeout(300)]


def _pngs(folder: ObjectPath) -> list[str]:
    return sorted(n[: -len(".png")] for n in storage.list_files(folder) if n.endswith(".png"))


def _json(path: ObjectPath) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def s3_run(debiased_run: Path, tiny_data: Path, ray_local, bucket: str) -> tuple[ObjectPath, dict]:
    """The finished debias stage (all that train reads from the run) and the dataset, uploaded;
    ``train`` run on them once. Returns the run URI and the config overrides."""
    run = upath(bucket) / "run"
    upload_tree(debiased_run / "debias", str(run / "debias"))  # read-only: the session run stays as it is
    data = upload_tree(tiny_data, f"{bucket}/data")
    over = {
        "data.root": data, "data.pseudo_labels": f"{data}/pseudo_labels", "debias.crf": False,
        "train.epochs": 1, "train.batch_size": 4, "train.num_workers": 1, "train.cpus_per_worker": 1.0,
        "train.crop_size": 32, "train.crf_iters": 2, "evaluate.batch_size": 6,
    }
    assert train.run(C.build(overrides=over), run) == run / "train"
    return run, over


def _history(folder: ObjectPath) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((folder / "history.csv").read_text())))


@pytest.mark.ray
def test_train_writes_every_artifact_to_the_bucket(s3_run, tiny_data: Path):
    run, over = s3_run
    out = current(run / "train")  # RUN/train/@<key>: the files of the current artifact
    assert out == run / "train" / f"@{_json(run / 'train' / 'manifest.json')['key']}"
    ds = VOCDataset(tiny_data)
    model, extra = load_segmenter_checkpoint(out / "model.pt", expect_name="deeplab_tiny", expect_num_classes=5)
    assert extra["classes"] == ds.classes and extra["epoch"] == 1
    (row,) = _history(out)
    assert int(row["step"]) == 4 and row["wce"] and row["val_miou"]  # 16 images, batch 4, one worker
    assert (out / "curves.png").stat().st_size > 1000
    m = _json(out / "manifest.json")
    assert m["status"] == "complete" and m["config"]["data"]["root"] == over["data.root"]
    assert _pngs(run / "complement") == sorted(ds.ids("train"))
    assert _pngs(run / "predict" / "val") == sorted(ds.ids("val"))
    assert read_label(run / "complement" / f"{ds.ids('train')[0]}.png").max() < 254  # Y^co: no BIASED left
    assert any(p.name.startswith("checkpoint_") for p in (out / "ray" / "mars").iterdir())  # Ray Train storage
    baseline = C.build(overrides={**over, "train.baseline": True})
    assert train.labels_dir(baseline, run) == upath(over["data.pseudo_labels"])  # a URI stays a URI
    assert not Path("s3:").exists()  # no stray local folder named after the URI


@pytest.mark.ray
def test_evaluate_from_the_bucket_then_reruns_skip(s3_run, tiny_data: Path, monkeypatch: pytest.MonkeyPatch):
    run, over = s3_run
    cfg = C.build(overrides=over)
    ev = evaluate.run(cfg, run)
    assert ev == run / "evaluate"
    ev = current(ev)
    metrics = _json(ev / "metrics.json")
    assert 0.0 <= metrics["miou"] <= 1.0 and metrics["images"] == len(VOCDataset(tiny_data).ids("val"))
    assert metrics["checkpoint"] == str(current(run / "train") / "model.pt")
    assert _pngs(ev / "pred") == sorted(VOCDataset(tiny_data).ids("val"))
    assert (ev / "table.txt").read_text().splitlines()[-1].startswith("mean")

    def fail(*_a, **_k):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(train, "_train_and_write", fail)
    monkeypatch.setattr(evaluate, "_predict_and_score", fail)
    assert train.run(cfg, run) == run / "train" and evaluate.run(cfg, run) == run / "evaluate"  # up to date: skipped


@pytest.mark.ray
@pytest.mark.slow
def test_more_epochs_resume_from_the_checkpoint_in_the_bucket(s3_run):
    """Ray Train restores its last checkpoint from the bucket: epoch 1 is not retrained."""
    run, over = s3_run
    (first,) = _history(current(run / "train"))[:1]
    train.run(C.build(overrides={**over, "train.epochs": 2}), run)
    rows = _history(current(run / "train"))
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[0]["loss"] == first["loss"]
    assert int(rows[1]["step"]) == 8 and _json(run / "train" / "manifest.json")["outputs"]["epochs"] == 2
    _, extra = load_segmenter_checkpoint(current(run / "train") / "model.pt")
    assert (extra["epoch"], extra["step"]) == (2, 8)


@pytest.mark.ray
@pytest.mark.slow
def test_wsss_on_s3(tiny_data: Path, ray_local, s3_bucket: str):
    data = upload_tree(tiny_data, f"{s3_bucket}/data")
    run = upath(s3_bucket) / "run"
    cfg = C.build(overrides={"data.root": data, "wsss.epochs": 1, "wsss.batch_size": 8, "wsss.crop_size": 48,
                             "wsss.cam_scales": [1.0], "wsss.cam_flip": False, "wsss.cam_eval_split": False})
    out = wsss.run(cfg, run)
    assert out == run / "wsss"
    pointer = _json(out / "manifest.json")
    out = current(out)
    assert out == run / "wsss" / pointer["current"]
    ds = VOCDataset(tiny_data)
    assert _pngs(out) == sorted(ds.ids("train"))
    image_id = ds.ids("train")[0]
    assert set(read_label(out / f"{image_id}.png").flatten().tolist()) <= {0, *ds.image_labels(image_id)}
    assert wsss.load_classifier(out / wsss.CLASSIFIER).num_classes == ds.num_classes
    assert [h["epoch"] for h in _json(out / "history.json")] == [1]
    assert not (out / "ray").exists()  # per-epoch checkpoints dropped once finished
    m = _json(out / "manifest.json")
    assert m["status"] == "complete"
    wsss.run(cfg, run)  # rerun: skipped, the manifest and the pointer are not rewritten
    assert _json(out / "manifest.json") == m and _json(run / "wsss" / "manifest.json") == pointer


def test_uss_reads_dataset_and_dino_weights_from_s3(tiny_data: Path, s3_bucket: str):
    """Inputs only (the training loop is the one ``test_uss`` runs): weights named by URI are checked
    before anything is written, and their fingerprint enters the stage key."""
    import torch

    from mars_ray.models import load_all
    from mars_ray.models.registry import BACKBONES
    from mars_ray.models.vit import save_dino_checkpoint

    load_all()

    data = upload_tree(tiny_data, f"{s3_bucket}/data")
    run = upath(s3_bucket) / "run"
    bad = save_dino_checkpoint(BACKBONES.get("small_cnn"), upath(s3_bucket) / "w" / "dino_wrong.pth")
    with pytest.raises(ValueError, match=r"s3://.*/dino_wrong\.pth.*missing keys"):
        uss.run(C.build(overrides={"data.root": data, "uss.backbone": "vit_tiny_test",
                                   "uss.backbone_weights": str(bad)}), run)
    assert not (run / "uss").exists()
    torch.manual_seed(0)
    good = save_dino_checkpoint(BACKBONES.get("vit_tiny_test"), upath(s3_bucket) / "w" / "dino_tiny.pth")
    cfg = C.build(overrides={"data.root": data, "uss.backbone": "vit_tiny_test", "uss.backbone_weights": str(good),
                             "uss.ssl_epochs": 0})
    sd = uss.stage_dir(cfg, run, uss.validate_inputs(cfg))
    assert sd.root == run / "uss" and sd.path == run / "uss" / f"@{sd.key}"
    assert sd.inputs["backbone_weights"].startswith("1:")
    assert uss.checkpoint_path(run) == run / "uss" / uss.CHECKPOINT
