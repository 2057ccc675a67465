"""benchmarks/scaling_doc.py and scale_bench.merge_results on hand-made results (no measuring)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import scale_bench
    import scaling_doc

    yield scale_bench, scaling_doc
    for name in ("scale_bench", "scaling_doc", "procmem"):
        sys.modules.pop(name, None)


def _run(load: float, **rows):
    return {"machine": {"cpus": 2, "load_avg_start": [load, load, load], "ray": "x", "torch": "y"},
            "args": {}, "wall_s": 1.0, **rows}


def test_merge_takes_each_row_from_its_run_and_recomputes_targets(bench):
    scale_bench, _ = bench
    eq = lambda d, ratio: {"d": d, "fg": 1, "bg": 1, "wall_ratio": ratio, "cpu1_ratio": ratio}  # noqa: E731
    a = _run(0.5, train={"ray_over_bare_steady": 0.95}, eq13=[eq(70, 7.0), eq(384, 9.0)], targets=[])
    b = _run(6.0, eq13=[eq(70, 4.0)], targets=[])
    out = scale_bench.merge_results([a, b])
    assert [r["machine"]["load_avg_start"][0] for r in out["runs"]] == [0.5, 6.0]
    again = scale_bench.merge_results([out, _run(9.0)])  # a merged result merged again keeps its runs
    assert [r["machine"]["load_avg_start"][0] for r in again["runs"]] == [0.5, 6.0, 9.0]
    assert [(r["d"], r["wall_ratio"]) for r in out["eq13"]] == [(70, 4.0), (384, 9.0)]
    met = {t["target"]: t["met"] for t in out["targets"]}
    assert met == {"Ray Train / bare loop (steady images/s)": True,
                   "Eq 1-3 in memory / one read pass, d=70 (wall)": True,
                   "Eq 1-3 in memory / one read pass, d=384 (wall)": False}


def test_doc_uses_cpu_seconds_and_flags_a_shared_machine(bench):
    scale_bench, scaling_doc = bench
    unit = {"size": 512, "images": 2, "features_s_per_image": 9.0, "debias_s_per_image": 9.0,
            "crf21_s_per_image": 9.0, "features_cpu_s_per_image": 0.2, "debias_cpu_s_per_image": 0.3,
            "crf21_cpu_s_per_image": 1.5}
    quiet = scaling_doc.values(_run(0.5, unit=unit), None)
    assert quiet["features_s_per_image"] == "0.200 s" and quiet["crf21_s"] == "1.500 s"
    assert quiet["load_note"] == ""
    # COCO features: 82,081 images x 0.2 s / 56 actors (jobs/coco.yaml)
    assert quiet["t_features_coco"] == scaling_doc._fmt_s(82_081 * 0.2 / scaling_doc._preset()["features_actors"])
    busy = scaling_doc.values(scale_bench.merge_results([_run(0.5, unit=unit), _run(20.0)]), None)
    assert "load average up to 20 on 2 cores" in busy["load_note"]
    text = scaling_doc.render((BENCH.parent / "docs" / "scaling.template.md").read_text(), _run(0.5, unit=unit), None)
    assert "{features_s_per_image" not in text and "{load_note" not in text
