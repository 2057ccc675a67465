"""``stages.evaluate_labels``: the in-process path equals the Ray path; where results may be written;
the pseudo labels' reference score of a sweep."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mars_ray import config as C
from mars_ray.data.voc import VOCDataset
from mars_ray.stages import evaluate_labels as EL

pytestmark = [pytest.mark.ray]


def test_in_process_confusions_equal_the_ray_path(debiased_run: Path, tiny_data: Path):
    folders = {"pseudo": tiny_data / "pseudo_labels", "debiased": debiased_run / "debias"}
    for biased_as in ("background", "ignore"):
        local = EL.confusions_local(VOCDataset(tiny_data), folders, "train", biased_as=biased_as)
        for name, folder in folders.items():
            ray_cm = EL.confusion(tiny_data, folder, "train", biased_as=biased_as)
            np.testing.assert_array_equal(local[name].mat, ray_cm.mat)
    with pytest.raises(FileNotFoundError, match="label folder does not exist"):
        EL.confusions_local(VOCDataset(tiny_data), {"label": tiny_data / "nope"}, "train")


def test_outputs_never_go_inside_an_input(tiny_data: Path, tmp_path: Path):
    inputs = {"labels": tiny_data / "pseudo_labels", "dataset": tiny_data}
    for inside in (tiny_data / "pseudo_labels" / "metrics.json", tiny_data / "x" / "m.json", tiny_data):
        with pytest.raises(ValueError, match="inside the .* folder"):
            EL.check_not_inside(inside, inputs)
    EL.check_not_inside(tmp_path / "m.json", inputs)
    EL.check_not_inside(str(tiny_data) + "_metrics.json", inputs)  # a sibling with the same prefix is fine
    assert EL.metrics_path(tmp_path / "run", tiny_data / "pseudo_labels") == tmp_path / "run" / "evaluate_labels" / "pseudo_labels.json"


def test_pseudo_label_reference_is_their_own_score(tiny_data: Path, ray_local):
    cfg = C.build(overrides={"data.root": str(tiny_data), "data.pseudo_labels": str(tiny_data / "pseudo_labels")})
    m = EL.summarize(EL.confusions_local(VOCDataset(tiny_data), {"p": tiny_data / "pseudo_labels"}, "train")["p"],
                     VOCDataset(tiny_data).classes)
    ref = EL.pseudo_label_reference(cfg, "debiased_fp")
    assert ref["value"] == pytest.approx(m["fp"]) and ref["split"] == "train" and ref["metric"] == "debiased_fp"
    assert (ref["miou"], ref["fn"]) == (pytest.approx(m["miou"]), pytest.approx(m["fn"]))
    assert EL.pseudo_label_reference(cfg, "val_miou")["value"] is None  # no counterpart without training
    ref = {**ref, "metric": "debiased_miou", "value": ref["miou"]}
    assert EL.reference_note(ref, ref["value"] + 0.02, "max").endswith("(+2.0, beats the pseudo labels)")
    assert "does not beat" in EL.reference_note(ref, ref["value"] - 0.02, "max")
    assert EL.reference_note(None, 0.5, "max") == ""
    with pytest.raises(ValueError, match="pseudo_labels"):
        EL.pseudo_label_reference(C.merge(cfg, {"data.pseudo_labels": ""}), "debiased_miou")


def _hand_made(root: Path) -> Path:
    """One 2×4 image, classes background/obj. GT and the evaluated label (255 and 254 in it):

    GT    0   0 1   1      label  0 255 1 255
          0   1 1 255             254  1 0   1
    """
    from PIL import Image

    from mars_ray.data.label_io import write_label

    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "labels"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((2, 4, 3), np.uint8)).save(root / "JPEGImages" / "a.png")
    write_label(root / "SegmentationClass" / "a.png", np.array([[0, 0, 1, 1], [0, 1, 1, 255]], np.uint8))
    write_label(root / "labels" / "a.png", np.array([[0, 255, 1, 255], [254, 1, 0, 1]], np.uint8))
    (root / "ImageSets/Segmentation/train.txt").write_text("a\n")
    (root / "classes.txt").write_text("background\nobj\n")
    return root


@pytest.mark.parametrize("pred_ignore, biased_as, mat, miou", [
    ("ignore", "background", [[2, 0], [1, 2]], 2 / 3),      # the label's 255 dropped; 254 → background
    ("background", "background", [[3, 0], [2, 2]], (3 / 5 + 2 / 4) / 2),  # IRN: the label's 255 → background
    ("background", "ignore", [[2, 0], [2, 2]], (2 / 4 + 2 / 4) / 2),  # 254 stays ignored, only 255 → background
])
def test_pred_ignore_conventions_on_a_hand_made_example(tmp_path: Path, ray_local, capsys, pred_ignore, biased_as,
                                                        mat, miou):
    import json

    from mars_ray.cli import main

    root = _hand_made(tmp_path / "data")
    local = EL.confusions_local(VOCDataset(root), {"l": root / "labels"}, "train", biased_as=biased_as,
                                pred_ignore=pred_ignore)["l"]
    assert local.mat.tolist() == mat
    out = tmp_path / "m.json"
    assert main(["evaluate-labels", "--data", str(root), "--labels", str(root / "labels"), "--split", "train",
                 "--biased-as", biased_as, "--pred-ignore", pred_ignore, "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["pred_ignore"] == pred_ignore and m["biased_as"] == biased_as
    assert m["miou"] == pytest.approx(miou) and m["pixels"] == sum(map(sum, mat))
    with pytest.raises(ValueError, match="--pred-ignore"):
        EL.confusions_local(VOCDataset(root), {"l": root / "labels"}, "train", pred_ignore="zero")
