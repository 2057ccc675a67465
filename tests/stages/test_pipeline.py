"""features → select → debias on a local Ray, checked against the pure algorithm."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from mars_ray import config as C
from mars_ray.algo.centroids import select_debiased_centroids
from mars_ray.data.label_io import read_label, write_label
from mars_ray.data.voc import VOCDataset
from mars_ray.stages import debias, features, select

from tests.conftest import copy_run

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


def _cfg(data: Path, **over) -> C.Config:
    return C.build(overrides={"data.root": str(data), "data.pseudo_labels": str(data / "pseudo_labels"),
                              "debias.crf": False, **over})


@pytest.fixture(scope="module")
def run(debiased_run: Path, tmp_path_factory) -> Path:
    """This module's copy of the session's features → select → debias run."""
    return copy_run(debiased_run, tmp_path_factory)


def _table(run_dir: Path):
    return pads.dataset(str(run_dir / "features" / features.TABLE), format="parquet").to_table()


def test_centroid_table(run: Path, tiny_data: Path):
    t = _table(run)
    assert t.column_names == ["image_id", "class_id", "is_bg", "k", "count", "gt_match", "gt_iou", "vector"]
    ds = VOCDataset(tiny_data)
    ids = set(ds.ids("train"))
    assert set(t.column("image_id").to_pylist()) <= ids
    cls = np.asarray(t.column("class_id"))
    k = np.asarray(t.column("k"))
    is_bg = np.asarray(t.column("is_bg"))
    assert np.array_equal(is_bg, cls == 0)
    assert k[~is_bg].max() < 2 and k[is_bg].max() < 2  # K_fg = K_bg = 2
    # every (image, class) of the pseudo labels has 1..K centroids whose counts sum to the region size
    df = t.select(["image_id", "class_id", "count"]).to_pandas()
    for image_id in list(ids)[:5]:
        label = read_label(tiny_data / "pseudo_labels" / f"{image_id}.png")
        for c in np.unique(label):
            if c in (254, 255):
                continue
            rows = df[(df.image_id == image_id) & (df.class_id == c)]
            assert 1 <= len(rows) <= 2
            assert rows["count"].sum() == (label == c).sum()
    gt_match = np.asarray(t.column("gt_match"))
    assert np.all((gt_match >= 0) & (gt_match <= 1))  # the tiny dataset has ground truth
    gt_iou = np.asarray(t.column("gt_iou"))
    assert np.all((gt_iou >= 0) & (gt_iou <= gt_match + 1e-6))  # |A∩G|/|A∪G| <= |A∩G|/|A|


def test_centroid_table_layout_lets_select_skip_row_groups(run: Path, tmp_path: Path):
    """The stage writes few files, background rows first; a file of several row groups then gives
    the reader's ``is_bg`` filter whole row groups to skip (row-group statistics)."""
    import pyarrow.compute as pc

    files = sorted((run / "features" / features.TABLE).glob("*.parquet"))
    assert len(files) == 1  # 16 images: far below ROWS_PER_FILE
    is_bg = np.asarray(pads.dataset(str(files[0])).to_table(columns=["is_bg"]).column("is_bg"))
    assert is_bg.any() and (~is_bg).any() and not np.any(np.diff(is_bg.astype(int)) > 0)  # bg, then fg
    t = _table(run)
    big = t.take(np.random.default_rng(0).integers(0, t.num_rows, 3 * features.ROW_GROUP_ROWS))
    features.write_table_file(big, str(tmp_path / "big.parquet"))
    frag = next(iter(pads.dataset(str(tmp_path / "big.parquet")).get_fragments()))
    n_groups = frag.metadata.num_row_groups
    bg_groups = len(frag.split_by_row_group(pc.field("is_bg")))
    fg_groups = len(frag.split_by_row_group(~pc.field("is_bg")))
    assert n_groups == 3 and bg_groups + fg_groups <= n_groups + 1  # at most one mixed row group


def test_select_equals_in_memory_algorithm(run: Path, tiny_data: Path):
    t = _table(run)
    vec = t.column("vector").combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1)
    is_bg = np.asarray(t.column("is_bg"))
    cls = np.asarray(t.column("class_id")).astype(np.int64)
    ref = select_debiased_centroids(vec[~is_bg], cls[~is_bg], vec[is_bg], alpha=0.40,
                                    num_classes=VOCDataset(tiny_data).num_classes)
    got = np.load(run / "select" / "centroids.npy")
    present = np.load(run / "select" / "present.npy")
    np.testing.assert_array_equal(present, ref.present)
    np.testing.assert_allclose(got, ref.centroids, rtol=1e-5, atol=1e-6)
    report = json.loads((run / "select" / "report.json").read_text())
    assert report["n_chosen"] == int(ref.chosen.sum())
    assert report["alpha"] == pytest.approx(0.40)
    for name, entry in report["per_class"].items():
        assert entry["n_chosen"] == int(np.ceil(0.4 * entry["n_centroids"] - 1e-9))
        assert 0.0 <= entry["target_ratio"] <= 1.0
    chosen = pads.dataset(str(run / "select" / "chosen.parquet")).to_table()
    assert chosen.num_rows == report["n_chosen"]


def test_select_paper_target_ratio(run: Path, tiny_data: Path, tmp_path: Path):
    """report.json: the paper's target ratio (IoU > 0.3) and biased ratio (IoU < 0.1) of the chosen
    centroids, overall and per class, next to our pixel-share measure; a table without gt_iou selects."""
    report = json.loads((run / "select" / "report.json").read_text())
    chosen = pads.dataset(str(run / "select" / "chosen.parquet")).to_table().to_pandas()
    iou = chosen["gt_iou"].to_numpy()
    assert report["paper_target_ratio"] == pytest.approx(float((iou > 0.3).mean()))
    assert report["paper_biased_ratio"] == pytest.approx(float((iou < 0.1).mean()))
    assert 0 <= report["paper_target_ratio_all"] <= 1 and "target_ratio" in report
    for name, e in report["per_class"].items():
        mine = chosen[chosen["class_id"] == e["class_id"]]["gt_iou"].to_numpy()
        assert e["paper_target_ratio"] == pytest.approx(float((mine > 0.3).mean())), name
        assert e["paper_biased_ratio"] == pytest.approx(float((mine < 0.1).mean())), name
    # an old table (no gt_iou column) still selects the same V^c; the paper ratios are absent
    other = tmp_path / "run"
    shutil.copytree(run / "features", other / "features")
    table = other / "features" / features.TABLE
    old = pads.dataset(str(table)).to_table().drop(["gt_iou"])
    shutil.rmtree(table)
    table.mkdir()
    import pyarrow.parquet as pq

    pq.write_table(old, table / "part-0.parquet")
    select.run(_cfg(tiny_data), other)
    np.testing.assert_array_equal(np.load(other / "select" / "centroids.npy"), np.load(run / "select" / "centroids.npy"))
    old_report = json.loads((other / "select" / "report.json").read_text())
    assert "paper_target_ratio" not in old_report and old_report["target_ratio"] == report["target_ratio"]


def test_debiased_labels(run: Path, tiny_data: Path):
    ids = VOCDataset(tiny_data).ids("train")
    n_biased = 0
    for image_id in ids:
        y_b = read_label(tiny_data / "pseudo_labels" / f"{image_id}.png")
        y_db = read_label(run / "debias" / f"{image_id}.png")
        changed = y_b != y_db
        # only foreground pixels of Y^b change, and only to BIASED (Eq 5)
        assert np.all(y_db[changed] == 254)
        assert np.all((y_b[changed] >= 1) & (y_b[changed] <= 253))
        n_biased += int(changed.sum())
    stats = json.loads((run / "debias" / "stats.json").read_text())
    assert stats["images"] == len(ids) and stats["biased_pixels"] == n_biased > 0


def test_rerun_skips_and_alpha_change_reuses_features(run: Path, tiny_data: Path):
    before = {p: (p / "manifest.json").stat().st_mtime_ns for p in (run / "features", run / "select")}
    cfg = _cfg(tiny_data)
    features.run(cfg, run)
    select.run(cfg, run)
    assert {p: (p / "manifest.json").stat().st_mtime_ns for p in before} == before
    # a new alpha leaves features alone and recomputes select
    other = run.parent / "run_alpha"
    shutil.copytree(run, other)
    cfg2 = _cfg(tiny_data, **{"select.alpha": 0.8})
    feat_m = (other / "features" / "manifest.json").read_text()
    features.run(cfg2, other)
    select.run(cfg2, other)
    assert (other / "features" / "manifest.json").read_text() == feat_m
    report = json.loads((other / "select" / "report.json").read_text())
    assert report["alpha"] == pytest.approx(0.8)


def test_debias_resumes_only_missing_ids(run: Path, tiny_data: Path):
    other = run.parent / "run_resume"
    shutil.copytree(run, other)
    manifest = json.loads((other / "debias" / "manifest.json").read_text())
    manifest["status"] = "running"  # as if the run had been killed
    (other / "debias" / "manifest.json").write_text(json.dumps(manifest))
    ids = VOCDataset(tiny_data).ids("train")
    kept = other / "debias" / f"{ids[0]}.png"
    mtime = kept.stat().st_mtime_ns
    (other / "debias" / f"{ids[1]}.png").unlink()
    debias.run(_cfg(tiny_data), other)
    assert kept.stat().st_mtime_ns == mtime
    assert (other / "debias" / f"{ids[1]}.png").is_file()
    assert json.loads((other / "debias" / "manifest.json").read_text())["status"] == "complete"


def test_bad_pseudo_labels_fail_before_outputs_change(run: Path, tiny_data: Path, tmp_path: Path):
    other = tmp_path / "run"
    shutil.copytree(run, other)
    bad = tmp_path / "pseudo"
    shutil.copytree(tiny_data / "pseudo_labels", bad)
    ids = VOCDataset(tiny_data).ids("train")
    (bad / f"{ids[2]}.png").unlink()
    snapshot = sorted(p.name for p in (other / "features").iterdir())
    cfg = C.build(overrides={"data.root": str(tiny_data), "data.pseudo_labels": str(bad)})
    with pytest.raises(ValueError, match=f"{ids[2]}.png"):
        features.run(cfg, other)
    assert sorted(p.name for p in (other / "features").iterdir()) == snapshot
    # a label with a size mismatch is named too
    (bad / f"{ids[2]}.png").write_bytes((tiny_data / "pseudo_labels" / f"{ids[2]}.png").read_bytes())
    write_label(bad / f"{ids[3]}.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match=f"{ids[3]}.png"):
        features.run(cfg, other)
    assert json.loads((other / "features" / "manifest.json").read_text())["status"] == "complete"


def test_out_of_range_label_value_is_named_and_old_artifact_kept(run: Path, tiny_data: Path, tmp_path: Path):
    other = tmp_path / "run"
    shutil.copytree(run, other)
    before = (other / "features" / "manifest.json").read_text()
    bad = tmp_path / "pseudo"
    shutil.copytree(tiny_data / "pseudo_labels", bad)
    ids = VOCDataset(tiny_data).ids("train")
    label = read_label(bad / f"{ids[0]}.png").copy()
    label[0, 0] = 77
    write_label(bad / f"{ids[0]}.png", label)
    cfg = C.build(overrides={"data.root": str(tiny_data), "data.pseudo_labels": str(bad)})
    with pytest.raises(Exception) as err:
        features.run(cfg, other)
    assert f"{ids[0]}.png" in str(err.value) and "77" in str(err.value)
    # the value error surfaced inside a Ray worker, after the stage began: the finished
    # artifact of the earlier inputs is back in place, untouched
    assert (other / "features" / "manifest.json").read_text() == before
    assert (other / "features" / features.TABLE).is_dir()


def test_select_histograms_and_debias_per_class_counts(run: Path, tiny_data: Path):
    """report.json's per-class histograms hold every centroid on shared edges; stats.json's per-class
    and most-biased counts equal those counted from the PNGs (what the run report shows)."""
    report = json.loads((run / "select" / "report.json").read_text())
    chosen = pads.dataset(str(run / "select" / "chosen.parquet")).to_table().to_pandas()
    for name, e in report["per_class"].items():
        h = e["histogram"]
        assert len(h["edges"]) == len(h["chosen"]) + 1 == len(h["not_chosen"]) + 1
        assert sum(h["chosen"]) == e["n_chosen"] and sum(h["chosen"]) + sum(h["not_chosen"]) == e["n_centroids"]
        mine = chosen[chosen["class_id"] == e["class_id"]]["distance"].to_numpy()
        assert np.histogram(mine, np.asarray(h["edges"]))[0].tolist() == h["chosen"]
    ds = VOCDataset(tiny_data)
    fg, biased, share = np.zeros(ds.num_classes + 1, int), np.zeros(ds.num_classes + 1, int), {}
    for i in ds.ids("train"):
        y_b, y_db = read_label(tiny_data / "pseudo_labels" / f"{i}.png"), read_label(run / "debias" / f"{i}.png")
        m = (y_b >= 1) & (y_b <= ds.num_classes)
        fg += np.bincount(y_b[m], minlength=ds.num_classes + 1)
        biased += np.bincount(y_b[m & (y_db == 254)], minlength=ds.num_classes + 1)
        share[i] = float((y_db == 254).mean())
    stats = json.loads((run / "debias" / "stats.json").read_text())
    assert {n: (e["foreground_pixels"], e["biased_pixels"]) for n, e in stats["per_class"].items()} == {
        ds.classes[c]: (int(fg[c]), int(biased[c])) for c in range(1, ds.num_classes + 1) if fg[c]}
    top = sorted((s for s in share.values() if s > 0), reverse=True)[:16]  # compared by value: ties may swap ids
    assert [r["biased_share"] for r in stats["most_biased"]] == pytest.approx(top)
    assert all(r["biased_share"] == pytest.approx(share[r["image_id"]]) for r in stats["most_biased"])
