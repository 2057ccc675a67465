"""``mars report``: the page opened in headless Chromium (file://), its images and its figures.

Chromium is driven through ``chromedriver``'s W3C WebDriver HTTP API with the standard library
(no selenium). Without Debian's ``chromium`` + ``chromium-driver`` the browser tests are skipped.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mars_ray import config as C
from mars_ray.data.label_io import read_label
from mars_ray.data.voc import VOCDataset
from tests.conftest import copy_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--hide-scrollbars"]
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="headless Chromium not installed (apt-get install chromium chromium-driver)")


class Chrome:
    """A headless Chromium session through chromedriver's WebDriver HTTP API (stdlib only)."""

    def __init__(self, profile: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{port}"
        self.sid = ""
        try:
            deadline = time.monotonic() + 30
            while not self._ready():
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("chromedriver did not start")
                time.sleep(0.2)
            options = {"binary": CHROMIUM, "args": [*CHROME_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,900"]}
            caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
            self.sid = self._call("POST", "/session", caps)["sessionId"]
        except BaseException:
            self.close()
            raise

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/status", timeout=2) as r:
                return bool(json.load(r)["value"].get("ready"))
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.load(r)["value"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"WebDriver {method} {path}: {e.read().decode()[:500]}") from None

    def open(self, url: str) -> None:
        self._call("POST", f"/session/{self.sid}/url", {"url": url})

    def js(self, script: str) -> Any:
        return self._call("POST", f"/session/{self.sid}/execute/sync", {"script": script, "args": []})

    def screenshot(self, path: Path) -> Path:
        """The whole page: the window is resized to the document's height first."""
        height = int(self.js("return document.documentElement.scrollHeight"))
        self._call("POST", f"/session/{self.sid}/window/rect", {"width": 1280, "height": min(height + 40, 16000)})
        path.write_bytes(base64.b64decode(self._call("GET", f"/session/{self.sid}/screenshot")))
        return path

    def close(self) -> None:
        if self.sid:
            try:
                self._call("DELETE", f"/session/{self.sid}")
            except (RuntimeError, OSError):
                pass  # the driver is stopped next anyway
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def chrome(tmp_path: Path):
    browser = Chrome(tmp_path / "chrome-profile")
    yield browser
    browser.close()


PAGE_STATE = """
const imgs = Array.from(document.images).map(i => ({src: i.getAttribute('src'), complete: i.complete,
                                                   w: i.naturalWidth, h: i.naturalHeight}));
const cells = {};
for (const t of document.querySelectorAll('table[id]')) {
  cells[t.id] = Array.from(t.querySelectorAll('tr')).map(tr => ({
    set: tr.dataset.set || null, cls: tr.dataset.class || null, image: tr.dataset.image || null,
    cells: Array.from(tr.querySelectorAll('td')).map(td => ({metric: td.dataset.metric || null,
      value: td.dataset.value || null, text: td.innerText.trim()}))}));
}
return {imgs: imgs, tables: cells, sections: Array.from(document.querySelectorAll('section')).map(s => s.id),
        ready: document.readyState};
"""


def load_page(chrome: Chrome, index: Path) -> dict[str, Any]:
    chrome.open(index.resolve().as_uri())
    deadline = time.monotonic() + 30
    state = chrome.js(PAGE_STATE)
    while (state["ready"] != "complete" or not all(i["complete"] for i in state["imgs"])) and time.monotonic() < deadline:
        time.sleep(0.2)
        state = chrome.js(PAGE_STATE)
    return state


def _metric(row: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in row["cells"] if c["metric"] == name)


# -- the run the page is made from ----------------------------------------------------------------


@pytest.fixture(scope="module")
def report_run(debiased_run: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's features → select → debias run, plus one epoch of MARS training (Y^co, history.csv)."""
    from mars_ray.stages import train

    run = copy_run(debiased_run, tmp_path_factory)
    cfg = C.build(overrides={"data.root": str(tiny_data), "data.pseudo_labels": str(tiny_data / "pseudo_labels"),
                             "debias.crf": False, "train.epochs": 1})
    C.dump_yaml(cfg, run / "config.yaml")
    train.run(cfg, run)
    return run


def _expected_removed(tiny_data: Path, run: Path) -> dict[str, float]:
    """Per class: share of the pseudo labels' pixels that Y^db marks biased, counted from the PNGs."""
    ds = VOCDataset(tiny_data)
    fg, biased = np.zeros(ds.num_classes + 1), np.zeros(ds.num_classes + 1)
    for i in ds.ids("train"):
        y_b = read_label(tiny_data / "pseudo_labels" / f"{i}.png")
        y_db = read_label(run / "debias" / f"{i}.png")
        m = (y_b >= 1) & (y_b <= ds.num_classes)
        fg += np.bincount(y_b[m], minlength=ds.num_classes + 1)
        biased += np.bincount(y_b[m & (y_db == 254)], minlength=ds.num_classes + 1)
    return {ds.classes[c]: biased[c] / fg[c] for c in range(1, ds.num_classes + 1) if fg[c]}


@pytest.mark.ray
@needs_chromium  # in the default suite: .ci/run installs chromium (about 40 s on the session's debiased run)
def test_report_opens_in_chromium_with_the_runs_figures(report_run: Path, tiny_data: Path, chrome: Chrome,
                                                         tmp_path: Path):
    from mars_ray.cli import main
    from mars_ray.stages.evaluate_labels import evaluate

    assert main(["report", str(report_run)]) == 0
    index = report_run / "report" / "index.html"
    state = load_page(chrome, index)
    shot = chrome.screenshot(tmp_path / "report.png")
    assert shot.stat().st_size > 10_000, shot
    assert state["sections"] == ["quality", "classes", "images", "training"]
    # every image rendered, and every one is a file under RUN/report, linked relatively
    assert len(state["imgs"]) > 10
    for img in state["imgs"]:
        assert img["complete"] and img["w"] > 0 and img["h"] > 0, img
        assert not img["src"].startswith(("/", "file:", "http")) and (index.parent / img["src"]).is_file()

    # label quality: the three label sets, each equal to `evaluate` over Ray (an independent path)
    rows = {r["set"]: r for r in state["tables"]["label-quality"] if r["set"]}
    assert list(rows) == ["pseudo", "debiased", "complemented"]
    for key, folder in (("pseudo", tiny_data / "pseudo_labels"), ("debiased", report_run / "debias"),
                        ("complemented", report_run / "complement")):
        m = evaluate(tiny_data, folder, "train")
        for name in ("miou", "fp", "fn"):
            cell = _metric(rows[key], name)
            assert float(cell["value"]) == pytest.approx(m[name], abs=1e-12), (key, name)
            assert cell["text"] == f"{100 * m[name]:.1f}"

    # per class: chosen counts from select, removed share counted from the label PNGs
    report = json.loads((report_run / "select" / "report.json").read_text())
    removed = _expected_removed(tiny_data, report_run)
    classes = {r["cls"]: r for r in state["tables"]["classes"] if r["cls"]}
    assert set(classes) == set(report["per_class"])
    for name, entry in report["per_class"].items():
        assert _metric(classes[name], "n_chosen")["text"] == f"{entry['n_chosen']} / {entry['n_centroids']}"
        assert float(_metric(classes[name], "biased_fraction")["value"]) == pytest.approx(removed[name], abs=1e-12)
        assert float(_metric(classes[name], "target_ratio")["value"]) == pytest.approx(entry["target_ratio"])
        assert float(_metric(classes[name], "paper_target_ratio")["value"]) == pytest.approx(entry["paper_target_ratio"])

    # the grid: the images with the largest biased share first, five columns (image, Y^b, Y^db, Y^co, GT)
    shares = {i: float((read_label(report_run / "debias" / f"{i}.png") == 254).mean())
              for i in VOCDataset(tiny_data).ids("train")}
    grid = [r for r in state["tables"]["grid"] if r["image"]]
    assert [shares[r["image"]] for r in grid] == pytest.approx(sorted((s for s in shares.values() if s > 0),
                                                                      reverse=True)[:12])
    assert all(len(r["cells"]) == 6 for r in grid)

    # training: one epoch of MARS
    history = (report_run / "train" / "history.csv").read_text().splitlines()
    assert [r["cells"][1]["text"] for r in state["tables"]["training"] if r["cells"]] == [str(len(history) - 1)]


@pytest.mark.ray
def test_report_reuses_saved_metrics_until_the_labels_change(debiased_run: Path, tiny_data: Path,
                                                           tmp_path_factory: pytest.TempPathFactory):
    from mars_ray.report import write_report

    run = copy_run(debiased_run, tmp_path_factory)
    cfg = C.build(overrides={"data.root": str(tiny_data), "data.pseudo_labels": str(tiny_data / "pseudo_labels"),
                             "debias.crf": False})
    C.dump_yaml(cfg, run / "config.yaml")
    index = write_report(run)
    html = index.read_text()
    assert 'id="label-quality"' in html and 'id="classes"' in html and 'id="grid"' in html
    assert 'id="training"' not in html and 'id="sweep"' not in html  # no train / tune outputs in this run
    saved = run / "evaluate_labels" / "debias.json"
    before = json.loads(saved.read_text())
    mtime = saved.stat().st_mtime_ns
    write_report(run)
    assert saved.stat().st_mtime_ns == mtime  # reused, not recomputed
    # a changed label file invalidates the saved metrics: the report recomputes them
    from mars_ray.data.label_io import write_label

    first = max(VOCDataset(tiny_data).ids("train"), key=lambda i: (read_label(run / "debias" / f"{i}.png") == 254).sum())
    y_db = read_label(run / "debias" / f"{first}.png")
    y_b = read_label(tiny_data / "pseudo_labels" / f"{first}.png")
    write_label(run / "debias" / f"{first}.png", np.where(y_db == 254, y_b, y_db).astype(np.uint8))  # undo Eq 5 here
    write_report(run)
    after = json.loads(saved.read_text())
    assert after["fingerprint"] != before["fingerprint"]
    assert after["fp"] != before["fp"] or after["fn"] != before["fn"]


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path: Path):
    from mars_ray.report import write_report

    with pytest.raises(FileNotFoundError, match="not a run folder"):
        write_report(tmp_path)
