"""The bad-input catalogue (issue 12): every bad input is one ``mars: error:`` line naming the file and
the cause, exit code 2, and the run folder's previous artifact intact; two unusual inputs are accepted.

One parametrised test over ``CASES``. Most cases fail before Ray starts (no ``ray`` mark); those that
can only fail inside a Ray worker (pixels are decoded there) are marked ``ray`` — and ``slow``, except
the issue's own reproduction, a pseudo label holding value 17 in a 4-class dataset.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from mars_ray.cli import main
from mars_ray.data.label_io import read_label, write_label

from tests.test_runlock import _Holder

pytestmark = [pytest.mark.timeout(300)]


@dataclass(frozen=True)
class Case:
    name: str
    argv: Callable[[Path, Path], list[str]]  # (dataset, run folder) → the command line
    expect: tuple[str, ...]  # substrings of the one error line ("{data}", "{run}" filled in)
    setup: Callable[[Path, Path], None] = lambda data, run: None
    accepted: bool = False  # a valid input: exit 0
    marks: tuple = field(default_factory=tuple)


def _stage(name: str, *extra: str, pseudo: bool = True) -> Callable[[Path, Path], list[str]]:
    def argv(data: Path, run: Path) -> list[str]:
        flags = ["--pseudo-labels", str(data / "pseudo_labels")] if pseudo else []
        return [name, "--data", str(data), *flags, "--out", str(run), *extra]
    return argv


def _edit_label(image_id: str, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path, Path], None]:
    def setup(data: Path, run: Path) -> None:
        path = data / "pseudo_labels" / f"{image_id}.png"
        write_label(path, fn(read_label(path).copy()))
    return setup


def _set_value(label: np.ndarray) -> np.ndarray:
    label[0, 0] = 17
    return label


def _split(text: str) -> Callable[[Path, Path], None]:
    def setup(data: Path, run: Path) -> None:
        (data / "ImageSets" / "Segmentation" / "train.txt").write_text(text)
    return setup


def _write(rel: str, content: "bytes | Callable[[Path], bytes]") -> Callable[[Path, Path], None]:
    def setup(data: Path, run: Path) -> None:
        path = data / rel
        path.write_bytes(content(path) if callable(content) else content)
    return setup


def _colour_map(data: Path, run: Path) -> None:
    path = data / "pseudo_labels" / "train_0001.png"
    Image.open(path).convert("RGB").save(path)


def _accepted_modes(data: Path, run: Path) -> None:
    """A 16-bit greyscale image, a palette image, a 16-bit label: all read as they should be."""
    images = data / "JPEGImages"
    grey = np.asarray(Image.open(images / "train_0000.png").convert("L"), np.uint16) * 257
    Image.fromarray(grey).save(images / "train_0000.png")  # mode I;16
    Image.open(images / "train_0001.png").convert("P", palette=Image.Palette.ADAPTIVE).save(images / "train_0001.png")
    label = data / "pseudo_labels" / "train_0002.png"
    Image.fromarray(read_label(label).astype(np.uint16)).save(label)


def _features(kind: str) -> Callable[[Path, Path], None]:
    """An external feature folder for every train id ([3, 12, 12] float32), one file made bad."""
    def setup(data: Path, run: Path) -> None:
        folder = data / "feats"
        folder.mkdir()
        ids = (data / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
        rng = np.random.default_rng(0)
        for i in ids:
            np.save(folder / f"{i}.npy", rng.normal(size=(3, 12, 12)).astype(np.float32))
        bad = folder / f"{ids[2]}.npy"
        bad.unlink()
        if kind == "nan-npz":
            arr = rng.normal(size=(3, 12, 12)).astype(np.float32)
            arr[0, 1, 1] = np.nan
            np.savez(folder / f"{ids[2]}.npz", features=arr)
        elif kind == "rank-pt":
            torch.save(torch.zeros(3, 12), folder / f"{ids[2]}.pt")
        else:  # d = 5 where the others have 3
            np.save(folder / f"{ids[2]}.npy", np.zeros((5, 12, 12), np.float32))
    return setup


def _jpeg(broken: Callable[[bytes], bytes]) -> Callable[[Path, Path], None]:
    """Image train_0002 as a JPEG (the built-in dataset writes PNGs), broken by ``broken``."""
    def setup(data: Path, run: Path) -> None:
        png = data / "JPEGImages" / "train_0002.png"
        jpg = png.with_suffix(".jpg")
        Image.open(png).convert("RGB").save(jpg, quality=95)
        png.unlink()
        jpg.write_bytes(broken(jpg.read_bytes()))
    return setup


def _truncate(jpeg: bytes) -> bytes:
    return jpeg[: len(jpeg) // 2]


def _space(grid: list) -> Callable[[Path, Path], list[str]]:
    def argv(data: Path, run: Path) -> list[str]:
        space = data / "space.yaml"
        space.write_text(json.dumps({"params": {"select.alpha": {"grid_search": grid}}}))
        return ["tune", "--space", str(space), "--data", str(data), "--pseudo-labels", str(data / "pseudo_labels"),
                "--out", str(run)]
    return argv


def _unwritable(data: Path, run: Path) -> list[str]:
    (data / "a-file").write_text("not a folder")
    return _stage("features")(data, data / "a-file" / "run")


RAY = (pytest.mark.ray,)
SLOW_RAY = (pytest.mark.ray, pytest.mark.slow)
CASES = [
    Case("missing root", lambda d, r: ["run", "--data", str(d / "nope"), "--out", str(r)],
         ("{data}/nope: dataset folder does not exist",)),
    Case("missing split", _stage("features", "--split", "nosuch"), ("nosuch.txt: split file for split 'nosuch' does not exist",)),
    Case("missing image", _stage("features"), ("{data}/JPEGImages: no image for id 'train_0002'",),
         setup=lambda d, r: (d / "JPEGImages" / "train_0002.png").unlink()),
    Case("unreadable JPEG", _stage("features"), ("{data}/JPEGImages/train_0002.jpg: cannot read image",),
         setup=_jpeg(lambda b: b"not a jpeg at all")),
    Case("truncated JPEG", _stage("features"), ("{data}/JPEGImages/train_0002.jpg: cannot decode image", "truncated"),
         setup=_jpeg(_truncate), marks=SLOW_RAY),
    Case("truncated JPEG in a Ray Train worker (wsss)", _stage("wsss", "--set", "wsss.epochs=1", "wsss.crop_size=32",
                                                                  pseudo=False),
         ("{data}/JPEGImages/train_0002.jpg: cannot decode image",), setup=_jpeg(_truncate),
         marks=SLOW_RAY),
    Case("16-bit and palette images, a 16-bit label: accepted", _stage("features"), (), setup=_accepted_modes,
         accepted=True, marks=SLOW_RAY),
    Case("label of the wrong size", _stage("features"), ("{data}/pseudo_labels/train_0001.png: pseudo label 24x24 but image 48x48",),
         setup=_edit_label("train_0001", lambda lab: lab[::2, ::2])),
    Case("label value out of range (17 in a 4-class dataset)", _stage("features"),
         ("{data}/pseudo_labels/train_0003.png: label values [17] outside {{0..4, 254, 255}}",),
         setup=_edit_label("train_0003", _set_value), marks=RAY),
    Case("label saved as an RGB colour map", _stage("features"),
         ("{data}/pseudo_labels/train_0001.png", "looks like a colour-map PNG", "--from-colormap"), setup=_colour_map),
    Case("empty split", _stage("features"), ("train.txt: split 'train' lists no image ids",), setup=_split("\n\n")),
    Case("duplicate id", _stage("features"), ("train.txt: duplicate ids ['train_0001']",),
         setup=_split("train_0000\ntrain_0001\ntrain_0001\n")),
    Case("id with spaces", _stage("features"), ("train.txt: line 2 'train 0001': an image id cannot contain spaces",),
         setup=_split("train_0000\ntrain 0001\n")),
    Case("classes.txt with fewer classes than the labels use", _stage("features"),
         ("{data}/pseudo_labels/train_", "outside {{0..2, 254, 255}}"),
         setup=_write("classes.txt", b"background\nboat\ntrain\n"), marks=SLOW_RAY),
    Case("image_labels.json naming an unknown class", _stage("wsss", pseudo=False),
         ("{data}/image_labels.json: 'train_0000' has class ids [7] outside 1..4",),
         setup=lambda d, r: (d / "image_labels.json").write_text(
             json.dumps({**json.loads((d / "image_labels.json").read_text()), "train_0000": [3, 7]}))),
    Case("NaN in .npz features", _stage("features", "--features-dir", "FEATS"),
         ("{data}/feats/train_0002.npz: features contain NaN or inf",), setup=_features("nan-npz"), marks=SLOW_RAY),
    Case("wrong-rank .pt features", _stage("features", "--features-dir", "FEATS"),
         ("{data}/feats/train_0002.pt: features must have shape [d, h, w], got (3, 12)",), setup=_features("rank-pt"),
         marks=SLOW_RAY),
    Case("wrong-d .npy features", _stage("features", "--features-dir", "FEATS"),
         ("{data}/feats/train_0002.npy: feature dimension 5 differs from 3",), setup=_features("d-npy")),
    Case("alpha = 0", _stage("run", "--set", "select.alpha=0"), ("select.alpha must be in (0, 1], got 0.0",)),
    Case("alpha = 1.5", _stage("select", "--set", "select.alpha=1.5"), ("select.alpha must be in (0, 1], got 1.5",)),
    Case("K larger than the image's pixels", _stage("features", "--set", "features.k_fg=5000"),
         ("{data}/pseudo_labels/train_0000.png: features.k_fg=5000 exceeds the 2304 pixels",)),
    Case("unknown key", _stage("run", "--set", "features.k_bgg=3"), ("unknown config key 'features.k_bgg'",)),
    Case("wrongly typed key", _stage("debias", "--set", "features.k_bg=two"),
         ("config key 'features.k_bg': expected an integer, got 'two'",)),
    Case("unwritable --out", _unwritable, ("{data}/a-file/run: cannot use this run folder: Not a directory",)),
    Case("empty tune grid", _space([]), ("params.select.alpha: grid_search needs a non-empty list",)),
    Case("unreachable tracking URI", lambda d, r: [*_space([0.4])(d, r), "--tracking-uri", "http://127.0.0.1:9"],
         ("http://127.0.0.1:9", "unreachable")),
    Case("NaN features inside every tune trial", lambda d, r: [*_space([0.3, 0.5])(d, r), "--quiet", "--features-dir", "FEATS"],
         ("{data}/feats/train_0002.npz: features contain NaN or inf",), setup=_features("nan-npz"), marks=SLOW_RAY),
    Case("second run into a locked folder", _stage("debias"),
         ("{run}: run folder in use by pid", "(mars run --out held-by-test)")),
]


SWEEP_LEFTOVERS = {"trials", "cache", "tune", "mlflow.db", "mlruns", "mlartifacts"}  # trial folders, MLflow runs


def _snapshot(run: Path) -> dict[str, str]:
    """Every file of the run folder and its bytes' hash (its logs and the lock files aside)."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file() and p.parts[len(run.parts)] != "logs" and not p.name.startswith(".mars.lock")}


def _previous_run(run: Path) -> None:
    """A run folder holding finished artifacts of an earlier command (what a bad input must not damage)."""
    from mars_ray.artifacts import atomic_write_json

    (run / "features" / "centroids.parquet").mkdir(parents=True)
    (run / "features" / "centroids.parquet" / "part-0.parquet").write_bytes(b"an earlier table")
    for stage in ("features", "select", "debias", "wsss"):
        atomic_write_json(run / stage / "manifest.json", {"stage": stage, "key": "earlier", "status": "complete",
                                                          "config": {}, "inputs": {}, "outputs": {}})
    (run / "config.yaml").write_text("# the earlier run's config\n")


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=c.marks) for c in CASES])
def test_bad_input_is_one_line_naming_file_and_cause(case: Case, tiny_data: Path, tmp_path: Path, capsys, request):
    if pytest.mark.ray in case.marks:
        request.getfixturevalue("ray_local")  # one Ray for the session; the CLI leaves a Ray it did not start
    data = Path(shutil.copytree(tiny_data, tmp_path / "data"))
    run = tmp_path / "run"
    _previous_run(run)
    case.setup(data, run)
    argv = [str(data / "feats") if a == "FEATS" else a for a in case.argv(data, run)]
    before = _snapshot(run)
    holder = _Holder(run) if "locked" in case.name else None
    try:
        rc = main(argv)
    finally:
        if holder is not None:
            holder.release()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("mars: ")]
    if case.accepted:
        assert rc == 0 and not lines, err[-2000:]
        return
    assert rc == 2 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("mars: error: ") and "Traceback (most recent call last)" not in err
    for part in case.expect:
        assert part.format(data=data, run=run) in lines[0], lines[0]
    after = _snapshot(run)  # the previous artifacts, untouched (a failed stage restores its own) …
    assert {k: after.get(k) for k in before} == before
    new = set(after) - set(before)  # … and nothing new, but what a failed sweep keeps to be looked at
    assert all(k.split("/")[0] in SWEEP_LEFTOVERS for k in new) if argv[0] == "tune" else not new, sorted(new)


def test_the_catalogue_is_complete():
    assert len(CASES) >= 20
    assert sum(c.accepted for c in CASES) >= 1
