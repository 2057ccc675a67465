"""features → select → debias with the dataset, the pseudo labels and the run folder on S3 (moto server).

The chain on S3 must give the numbers of the local session run (same data, same result), skip
on a rerun, share a features cache on S3 between runs (a cluster-wide lock, link manifests), and
keep a finished artifact when bad input on S3 makes a stage fail.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from mars_ray import config as C
from mars_ray import storage
from mars_ray.algo.metrics import ConfusionMatrix, map_biased
from mars_ray.artifacts import current, load_npy, read_manifest
from mars_ray.data.label_io import read_label, write_label
from mars_ray.data.voc import VOCDataset
from mars_ray.features import FeatureSource, check_feature_folder, feature_file_shape
from mars_ray.stages import cache, debias, evaluate_labels, features, inputs, select
from mars_ray.stages.locks import cluster_lock, lock_actor
from mars_ray.storage import upath

from tests.conftest import upload_tree

pytestmark = [pytest.mark.timeout(300)]

STAGES = ("features", "select", "debias")


def _cfg(root: str, pseudo: str, **over) -> C.Config:
    return C.build(overrides={"data.root": root, "data.pseudo_labels": pseudo, "debias.crf": False, **over})


def _copy(src: str, dst: str) -> None:
    """Server-side copy of everything below ``src`` to ``dst`` (same bucket)."""
    import pyarrow.fs as pafs

    s, d = upath(src), upath(dst)
    pafs.copy_files(s.fs_path, d.fs_path, source_filesystem=s.fs, destination_filesystem=d.fs)


@pytest.fixture(scope="module")
def s3_data(bucket: str, tiny_data: Path) -> str:
    return upload_tree(tiny_data, f"{bucket}/data")


@pytest.fixture(scope="module")
def s3_run(bucket: str, s3_data: str, ray_local) -> str:
    """The chain with ``data.root``, ``data.pseudo_labels`` and RUN all on S3."""
    run = f"{bucket}/run"
    cfg = _cfg(s3_data, f"{s3_data}/pseudo_labels")
    for stage in (features, select, debias):
        stage.run(cfg, upath(run))
    return run


# -- the lock --------------------------------------------------------------------------------------


@pytest.mark.ray
def test_cluster_lock_excludes_renews_and_takes_over_expired_leases(ray_local):
    key = f"test:{uuid.uuid4().hex}"
    spans: list[tuple[float, float]] = []

    def hold() -> None:
        with cluster_lock(key, ttl_s=5):
            t0 = time.monotonic()
            time.sleep(0.4)
            spans.append((t0, time.monotonic()))

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans.sort()
    assert len(spans) == 3 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # never two at once

    actor = lock_actor()
    # a live lease is renewed while held: a short ttl does not let a waiter in
    with cluster_lock(key, ttl_s=0.6) as holder:
        time.sleep(1.5)
        assert ray_local.get(actor.holder.remote(key)) == holder
        assert not ray_local.get(actor.acquire.remote(key, "intruder", 5.0, 0.3))
    assert ray_local.get(actor.holder.remote(key)) is None  # released on exit

    # a holder that died without releasing: its lease expires and the next one takes over
    assert ray_local.get(actor.acquire.remote(key, "dead-process", 1.0))
    t0 = time.monotonic()
    with cluster_lock(key, ttl_s=5) as holder:
        waited = time.monotonic() - t0
        assert ray_local.get(actor.holder.remote(key)) == holder
    assert 0.5 < waited < 4.0
    assert not ray_local.get(actor.release.remote(key, "dead-process"))  # no longer its lease


# -- external features from S3 (no Ray) -----------------------------------------------------------


def test_external_features_from_s3(s3_bucket: str, tmp_path: Path):
    rng = np.random.default_rng(0)
    feats = {i: rng.random((4, 6, 8), dtype=np.float32) for i in ("a", "b", "c")}
    local = tmp_path / "feats"
    local.mkdir()
    np.save(local / "a.npy", feats["a"])
    np.savez(local / "b.npz", features=feats["b"])
    torch.save(torch.from_numpy(feats["c"]), local / "c.pt")
    uri = upload_tree(local, f"{s3_bucket}/feats")
    check_feature_folder(upath(uri), ["a", "b", "c"])
    assert feature_file_shape(upath(uri) / "a.npy") == (4, 6, 8)
    image = np.zeros((12, 16, 3), np.uint8)
    remote, here = FeatureSource(features_dir=uri), FeatureSource(features_dir=local)
    for i in feats:
        np.testing.assert_array_equal(remote(i, image), here(i, image))
    with pytest.raises(FileNotFoundError, match=rf"{uri}: no feature file for image 'zz'"):
        check_feature_folder(upath(uri), ["a", "zz"])
    fingerprint = inputs.feature_source_fingerprint({"features_dir": uri})["features_dir"]
    assert fingerprint.startswith("3:")
    with storage.atomic_open(upath(uri) / "d.npy") as f:
        np.save(f, np.zeros((5, 6, 8), np.float32))
    with pytest.raises(ValueError, match=rf"{uri}/d\.npy: feature dimension 5 differs from 4"):
        check_feature_folder(upath(uri), ["a", "d"])
    assert inputs.feature_source_fingerprint({"features_dir": uri})["features_dir"] not in ("", fingerprint)
    upath(f"{uri}/e.npy").write_bytes(b"not an array")
    with pytest.raises(ValueError, match=rf"{uri}/e\.npy: not a readable \.npy file"):
        check_feature_folder(upath(uri), ["e"])
    upath(f"{uri}/f.npy").write_bytes(upath(f"{uri}/a.npy").read_bytes()[:-8])
    with pytest.raises(ValueError, match=rf"{uri}/f\.npy: cannot read features"):
        FeatureSource(features_dir=uri)("f", image)


# -- the chain on S3 --------------------------------------------------------------------------------


@pytest.mark.ray
def test_chain_on_s3_equals_the_local_run(s3_run: str, s3_data: str, debiased_run: Path, tiny_data: Path):
    run = upath(s3_run)
    for stage in STAGES:
        m = read_manifest(run / stage)
        assert m and m["status"] == "complete" and "link" not in m, stage
        assert m["current"] == f"@{m['key']}" and current(run / stage) == run / stage / m["current"], stage
        assert storage.list_files(run / stage) == {"manifest.json": storage.list_files(run / stage)["manifest.json"]}
    assert cache.resolve(run) == current(run / "features")
    feats, sel, deb = (current(run / s) for s in STAGES)  # the files: under each stage's current prefix
    assert features.table_stats(feats / features.TABLE) == {
        k: v for k, v in read_manifest(debiased_run / "features")["outputs"].items() if k in ("rows", "fg_rows", "bg_rows", "dim")}
    local_digest = read_manifest(debiased_run / "features")["outputs"]["uss_stats_digest"]
    assert read_manifest(run / "features")["outputs"]["uss_stats_digest"] == local_digest  # the same fit
    np.testing.assert_allclose(load_npy(sel / "centroids.npy"),
                               np.load(debiased_run / "select" / "centroids.npy"), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(load_npy(sel / "present.npy"), np.load(debiased_run / "select" / "present.npy"))
    assert (sel / "chosen.parquet").is_file()
    ids = VOCDataset(tiny_data).ids("train")
    written = storage.list_files(deb)
    assert {f"{i}.png" for i in ids} <= set(written) and not any(n.startswith(".") for n in written)
    for i in ids:
        np.testing.assert_array_equal(read_label(deb / f"{i}.png"),
                                      read_label(debiased_run / "debias" / f"{i}.png"))
    s3_stats = json.loads((deb / "stats.json").read_text())
    local_stats = json.loads((debiased_run / "debias" / "stats.json").read_text())
    assert s3_stats == local_stats and s3_stats["biased_pixels"] > 0
    # evaluate-labels of the S3 labels against the S3 ground truth = the metrics of the local files
    got = evaluate_labels.confusion(s3_data, run / "debias", "train")
    ds = VOCDataset(tiny_data)
    ref = ConfusionMatrix(ds.num_classes + 1)
    for i in ids:
        ref.update(map_biased(read_label(debiased_run / "debias" / f"{i}.png")), read_label(ds.gt_path(i)))
    np.testing.assert_array_equal(got.mat, ref.mat)


@pytest.mark.ray
def test_rerun_on_s3_skips(s3_run: str, s3_data: str):
    run = upath(s3_run)
    before = {s: (run / s / "manifest.json").read_bytes() for s in STAGES}
    cfg = _cfg(s3_data, f"{s3_data}/pseudo_labels")
    for stage in (features, select, debias):
        stage.run(cfg, run)
    assert {s: (run / s / "manifest.json").read_bytes() for s in STAGES} == before


@pytest.mark.ray
def test_debias_resume_on_s3_writes_only_missing_labels(s3_run: str, s3_data: str, bucket: str, tiny_data: Path):
    other = f"{bucket}/run_resume"
    _copy(s3_run, other)
    run = upath(other)
    prefix = current(run / "debias")
    m = read_manifest(prefix)
    m["status"] = "running"  # as if the first run had been killed: its prefix unfinished, no pointer yet
    (prefix / "manifest.json").write_text(json.dumps(m))
    (run / "debias" / "manifest.json").unlink()
    ids = VOCDataset(tiny_data).ids("train")
    kept_before = storage.list_files(prefix)[f"{ids[0]}.png"]
    (prefix / f"{ids[1]}.png").unlink()
    debias.run(_cfg(s3_data, f"{s3_data}/pseudo_labels"), run)
    assert current(run / "debias") == prefix  # same key → same prefix, resumed, then made current
    after = storage.list_files(prefix)
    assert after[f"{ids[0]}.png"] == kept_before and f"{ids[1]}.png" in after
    assert read_manifest(run / "debias")["status"] == read_manifest(prefix)["status"] == "complete"
    np.testing.assert_array_equal(read_label(prefix / f"{ids[1]}.png"),
                                  read_label(current(upath(s3_run) / "debias") / f"{ids[1]}.png"))


@pytest.mark.ray
def test_features_cache_on_s3_computes_once_for_two_runs(s3_run: str, s3_data: str, bucket: str, monkeypatch):
    calls = []
    compute = features._compute

    def counting(cfg, run_dir, dataset, sd, stats=None):
        calls.append(sd.path)
        compute(cfg, run_dir, dataset, sd, stats)

    monkeypatch.setattr(features, "_compute", counting)
    cfg = _cfg(s3_data, f"{s3_data}/pseudo_labels", **{"features.cache_dir": f"{bucket}/cache"})
    runs = [upath(f"{bucket}/cached{i}") for i in range(2)]
    errors: list[BaseException] = []

    def one(run) -> None:
        try:
            features.run(cfg, run)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1
    target = features.cache_path(cfg, runs[0])
    assert str(target).startswith(f"{bucket}/cache/features-")
    assert calls[0] == target / f"@{read_manifest(target)['key']}"
    for r in runs:
        assert cache.resolve(r) == current(target) == calls[0]
        link = read_manifest(r / "features")
        assert link["status"] == "complete" and link["link"] == str(target) and "current" not in link
        assert link["key"] == read_manifest(target)["key"] == read_manifest(upath(s3_run) / "features")["key"]
        assert set(storage.list_files(r / "features")) == {"manifest.json"}  # no table copy
    # a rerun changes nothing; select reads the table through the link
    before = (runs[1] / "features" / "manifest.json").read_bytes()
    features.run(cfg, runs[1])
    assert len(calls) == 1 and (runs[1] / "features" / "manifest.json").read_bytes() == before
    select.run(cfg, runs[1])
    np.testing.assert_allclose(load_npy(current(runs[1] / "select") / "centroids.npy"),
                               load_npy(current(upath(s3_run) / "select") / "centroids.npy"), rtol=1e-5, atol=1e-6)
    # a link whose cache folder is gone is named, not followed into nothing
    storage.rmtree(target)
    with pytest.raises(FileNotFoundError, match=rf"{runs[0]}/features/manifest.json: links to {target}"):
        cache.resolve(runs[0])


@pytest.mark.ray
def test_bad_pseudo_labels_on_s3_are_named_and_keep_the_finished_artifact(
    s3_run: str, s3_data: str, bucket: str, tiny_data: Path
):
    other = f"{bucket}/run_bad"
    _copy(f"{s3_run}/features", f"{other}/features")
    feat = upath(other) / "features"
    before = (feat / "manifest.json").read_bytes()
    bad = f"{bucket}/pseudo_bad"
    upload_tree(tiny_data / "pseudo_labels", bad)
    ids = VOCDataset(tiny_data).ids("train")
    cfg = _cfg(s3_data, bad)
    # a PNG that is no image at all: named by the header check, before anything is touched
    garbage = upath(bad) / f"{ids[2]}.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(ValueError, match=rf"{garbage}"):
        features.run(cfg, upath(other))
    assert (feat / "manifest.json").read_bytes() == before
    # a readable label with a value out of range: fails in a Ray worker after the stage began,
    # and the finished artifact it had set aside comes back untouched
    garbage.write_bytes((tiny_data / "pseudo_labels" / f"{ids[2]}.png").read_bytes())
    label = read_label(tiny_data / "pseudo_labels" / f"{ids[0]}.png").copy()
    label[0, 0] = 77
    write_label(upath(bad) / f"{ids[0]}.png", label)
    with pytest.raises(Exception) as err:
        features.run(cfg, upath(other))
    assert f"{bad}/{ids[0]}.png" in str(err.value) and "77" in str(err.value)
    assert (feat / "manifest.json").read_bytes() == before
    assert features.table_stats(current(feat) / features.TABLE)["rows"] == read_manifest(feat)["outputs"]["rows"]
    assert not (upath(other) / ".features.prev").exists()
