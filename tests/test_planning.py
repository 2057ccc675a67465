"""``mars_ray.pipeline``: the one planning rule that ``mars run``, ``mars tune`` and the demo share.

(The CLI's view of the same rule, flag by flag, is ``tests/e2e/test_situations.py``.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mars_ray import pipeline

TAIL = ["features", "select", "debias", "train", "evaluate"]


@pytest.mark.parametrize(
    "overrides, searched, extractor, stages",
    [
        ({}, (), "adaptive", ["wsss", *TAIL]),  # nothing given: CAM labels, adaptive features fitted on the split
        ({"data.pseudo_labels": "P"}, (), "adaptive", TAIL),  # pseudo labels given: the weight-free default
        ({"data.features_dir": "F"}, (), "adaptive", ["wsss", *TAIL]),  # features given: no USS to train
        ({"features.extractor": "texture"}, (), "texture", ["wsss", *TAIL]),  # chosen: kept
        ({"features.extractor": "stego"}, (), "stego", ["wsss", "uss", *TAIL]),  # learned (--uss): trained first
        ({"features.extractor": "stego", "features.checkpoint": "ck.pt"}, (), "stego", ["wsss", *TAIL]),  # given
    ],
)
def test_the_rule(tmp_path: Path, overrides: dict, searched: tuple, extractor: str, stages: list[str]):
    cfg = pipeline.build_config(None, {"data.root": str(tmp_path), **overrides}, plan_inputs=True,
                                searched=searched)
    assert cfg.features.extractor == extractor
    assert pipeline.plan_stages(cfg) == stages


def test_a_config_file_choice_counts_and_single_stages_keep_the_config(tmp_path: Path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"features": {"extractor": "texture"}}))
    cfg = pipeline.build_config(config, {"data.root": str(tmp_path)}, plan_inputs=True)
    assert cfg.features.extractor == "texture"
    # one stage (`mars features …`) is not a planned run: the config is taken as it is
    assert pipeline.build_config(None, {"data.root": str(tmp_path)}).features.extractor == "adaptive"


def test_until_and_unknown_stages(tmp_path: Path):
    cfg = pipeline.build_config(None, {"data.root": str(tmp_path), "features.extractor": "stego"}, plan_inputs=True)
    assert pipeline.plan_stages(cfg, until="uss") == ["wsss", "uss"]
    assert pipeline.plan_stages(cfg, until="select") == ["wsss", "uss", "features", "select"]
    with pytest.raises(ValueError, match="no dataset"):
        pipeline.build_config(None, {})
    with pytest.raises(ValueError, match="unknown stage 'debais'"):
        pipeline.stage_module("debais")
