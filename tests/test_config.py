from pathlib import Path

import pytest

from mars_ray import config as C


def test_defaults_are_the_paper_settings():
    """Only what the paper states (README "Stated vs chosen settings"): K_fg, K_bg, alpha, WCE."""
    cfg = C.build()
    assert cfg.select.alpha == pytest.approx(0.40)
    assert cfg.features.k_bg == 2 and cfg.features.k_fg == 2
    assert cfg.train.wce


def test_yaml_then_set_then_types(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("select:\n  alpha: 0.3\nfeatures:\n  k_bg: 4\n")
    cfg = C.build(f, C.parse_set(["select.alpha=0.7", "debias.crf=false"]))
    assert cfg.select.alpha == pytest.approx(0.7)  # --set wins over the file
    assert cfg.features.k_bg == 4
    assert cfg.debias.crf is False
    assert cfg.debias.crf_kwargs() is None


@pytest.mark.parametrize(
    "item, match",
    [
        ("select.alpah=0.3", "unknown config key 'select.alpah'"),
        ("nosection.x=1", "unknown config key 'nosection.x'"),
        ("features.k_bg=two", "features.k_bg.*integer"),
        ("debias.crf=maybe", "debias.crf.*true/false"),
        ("select.alpha=1.5", r"select.alpha must be in \(0, 1\]"),
        ("select.alpha=0", r"select.alpha must be in \(0, 1\]"),
        ("features.k_fg=0", "features.k_fg must be >= 1"),
        ("debias.threshold=1.0", r"debias.threshold must be in \(0, 1\)"),
        ("evaluate.crf_iters=0", "evaluate.crf_iters must be >= 1"),
        ("evaluate.crf_bilateral_srgb=0", "evaluate.crf_bilateral_srgb must be > 0"),
        ("evaluate.crf_gauss_compat=-1", "evaluate.crf_gauss_compat must be >= 0"),
        ("train.crf_reference_side=-1", "train.crf_reference_side must be >= 0"),
        ("train.complement_scales=[1.0,0]", "train.complement_scales must be positive factors"),
        ("debias.crf_unary=softmax", "debias.crf_unary must be .symmetric. or .ratio."),
    ],
)
def test_bad_overrides_name_the_key(item: str, match: str):
    with pytest.raises(ValueError, match=match):
        C.build(overrides=C.parse_set([item]))


def test_set_requires_key_value():
    with pytest.raises(ValueError, match="key=value"):
        C.parse_set(["select.alpha"])


def test_bad_yaml_file_is_named(tmp_path: Path):
    f = tmp_path / "bad.yaml"
    f.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        C.build(f)


def test_dump_and_reload_round_trip(tmp_path: Path):
    cfg = C.build(overrides={"select.alpha": 0.25, "data.root": "/x"})
    C.dump_yaml(cfg, tmp_path / "config.yaml")
    assert C.build(tmp_path / "config.yaml") == cfg


def test_slice_hash_is_stable_and_sensitive():
    a = C.slice_hash({"x": 1, "y": [1, 2]})
    assert a == C.slice_hash({"y": [1, 2], "x": 1})
    assert a != C.slice_hash({"x": 2, "y": [1, 2]})


def test_list_keys_accept_a_scalar_and_comma_lists():
    assert C.build(overrides=C.parse_set(["evaluate.scales=1.0"])).evaluate.scales == (1.0,)
    assert C.build(overrides=C.parse_set(["evaluate.scales=0.5,1.5"])).evaluate.scales == (0.5, 1.5)
    with pytest.raises(ValueError, match="evaluate.scales"):
        C.build(overrides=C.parse_set(["evaluate.scales=big"]))


def test_config_on_an_object_store(s3_bucket: str):
    """``mars run --config s3://…/best.yaml``: configs are read from and written to URIs."""
    from mars_ray.storage import upath

    src = upath(s3_bucket) / "configs" / "c.yaml"
    src.write_text("job: {description: ignored}\nselect:\n  alpha: 0.3\nfeatures:\n  k_bg: 4\n")
    cfg = C.build(f"{s3_bucket}/configs/c.yaml", {"debias.crf": False})
    assert cfg.select.alpha == pytest.approx(0.3) and cfg.features.k_bg == 4 and cfg.debias.crf is False
    C.dump_yaml(cfg, upath(s3_bucket) / "run" / "config.yaml")
    assert C.build(f"{s3_bucket}/run/config.yaml") == cfg
    with pytest.raises(FileNotFoundError, match=f"{s3_bucket}/nope.yaml"):
        C.build(f"{s3_bucket}/nope.yaml")
    (upath(s3_bucket) / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ValueError, match=f"{s3_bucket}/bad.yaml: expected a mapping"):
        C.build(f"{s3_bucket}/bad.yaml")


@pytest.mark.parametrize(
    "key, value, match",
    [  # every section's data-free checks live in config.validate (issue 12: several were in the stages)
        ("train.lr", -1, "train.lr must be > 0"),
        ("train.num_workers", 3, "not divisible by train.num_workers"),
        ("train.output_stride", 32, "train.output_stride must be 8 or 16"),
        ("train.scale_min", 3.0, "scale_min/scale_max"),
        ("train.model", "unet", "train.model='unet' is not a segmentation model; known: deeplab"),
        ("uss.knn", 0, "uss.knn must be >= 1"),
        ("uss.backbone", "vit_small_8", "needs uss.backbone_weights"),
        ("uss.backbone", "nope", "uss.backbone='nope' is not a backbone"),
        ("wsss.cam_scales", [], "wsss.cam_scales must be positive factors"),
        ("wsss.classifier", "vgg", "wsss.classifier='vgg' is not a classifier"),
        ("evaluate.scales", [1.0, 0.0], "evaluate.scales must be positive factors"),
        ("evaluate.batch_size", 0, "evaluate.batch_size must be >= 1"),
        ("features.extractor", "dino", "features.extractor='dino' is not a feature extractor"),
        ("features.cpus_per_actor", 0, "features.cpus_per_actor must be > 0"),
        ("features.gpus_per_actor", -0.5, "features.gpus_per_actor must be >= 0"),
        ("debias.gpus_per_actor", -1, "debias.gpus_per_actor must be >= 0"),
        ("train.crf_workers", 0, "train.crf_workers must be >= 1"),
        ("debias.threshold", 1.5, r"debias.threshold must be in \(0, 1\)"),
        ("debias.crf_bilateral_srgb", 0, "debias.crf_bilateral_srgb must be > 0"),
        ("select.chunk_rows", 0, "select.chunk_rows must be >= 1"),
        ("ray.num_cpus", -2, "ray.num_cpus must be >= 0"),
    ],
)
def test_every_data_free_check_is_in_config_validation(key: str, value, match: str):
    with pytest.raises(ValueError, match=match):
        C.build(overrides={key: value})
