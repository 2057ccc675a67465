"""``mars`` command line: one subcommand per stage, ``mars run`` for all of them, ``mars demo``.

The config object is built here (defaults → ``--config`` YAML → ``--set`` → explicit flags) and
handed to the stages; nothing below this module parses arguments.

Run folders (``--out``), ``--config`` files, datasets (``--data``) and label folders may be local
paths or object-store URIs such as ``s3://bucket/run`` (``mars_ray.storage``).

At ~500 lines this is over the house's ~450: it is the argparse definition of every documented
command and flag (the CLI is a stable interface; one file shows all of it) plus one thin function per
command; splitting the parsers from their commands would put each flag two files away from its use.
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from mars_ray import config as C
from mars_ray import console, errors, pipeline
from mars_ray.storage import AnyPath, upath

logger = logging.getLogger("mars_ray")

#: commands whose --out is a run folder (locked while they run; their errors go to RUN/logs)
RUN_COMMANDS = ("run", *pipeline.PRE_STAGES, *pipeline.STAGES, "tune")


# -- config from flags --------------------------------------------------------------------------


def _add_config_flags(p: argparse.ArgumentParser, *, out_required: bool = True,
                      split_help: str = "image split to debias (default: train)") -> None:
    p.add_argument("--data", help="dataset root (VOC-style layout; a folder or a URI such as s3://bucket/voc); "
                                  "same as --set data.root=…")
    p.add_argument("--pseudo-labels", help="folder (or URI) of pseudo-label PNGs {id}.png from any WSSS method")
    p.add_argument("--features-dir", help="folder (or URI) of external USS features {id}.npy|npz|pt ([d, h, w])")
    p.add_argument("--image-labels", help="image-level labels: cls_labels.npy (IRN/AMN/ToCo/MCTformer), VOC "
                                          "Annotations/ or image_labels.json; same as --set data.image_labels=…")
    p.add_argument("--uss", action="store_true",
                   help="use the built-in learned USS (features.extractor=stego; `mars run` trains it first)")
    p.add_argument("--split", help=split_help)
    p.add_argument("--out", required=out_required,
                   help="run folder or object-store URI (s3://bucket/run); every stage writes RUN/<stage>/")
    p.add_argument("--config", help="YAML config file, local or a URI (sections data, features, select, debias, ray, …)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides, e.g. select.alpha=0.3")
    p.add_argument("--wait", action="store_true",
                   help="when another process holds --out, wait for it (default: refuse at once, naming it)")


def overrides_from_args(args: argparse.Namespace, *, split_key: str = "data.split") -> dict[str, Any]:
    """``--set`` items plus the shorthand flags (``--data``, ``--pseudo-labels``, … , ``--uss``).

    ``split_key``: the config key ``--split`` sets (``data.eval_split`` for ``mars evaluate``).
    """
    overrides: dict[str, Any] = C.parse_set(args.set)
    flags = {"data.root": args.data, "data.pseudo_labels": args.pseudo_labels,
             "data.features_dir": args.features_dir, split_key: args.split,
             "data.image_labels": getattr(args, "image_labels", None)}
    overrides.update({k: v for k, v in flags.items() if v is not None})
    if getattr(args, "uss", False):
        overrides[pipeline.EXTRACTOR_KEY] = pipeline.LEARNED_EXTRACTOR
    return overrides


def config_from_args(args: argparse.Namespace, *, build_missing: bool = False) -> C.Config:
    """Defaults → ``--config`` → ``--set`` → flags; ``build_missing`` (``mars run``) applies the
    pipeline's planning rule for the extractor (``pipeline.build_config``)."""
    return pipeline.build_config(args.config, overrides_from_args(args), plan_inputs=build_missing)


@contextmanager
def _locked_run(args: argparse.Namespace, cfg: C.Config) -> Iterator[AnyPath]:
    """Hold ``--out`` (``runlock``: one writer per run folder), then write its ``config.yaml`` — the
    previous one comes back when the command fails, as the stages bring back their previous artifacts."""
    from mars_ray.artifacts import provisional
    from mars_ray.runlock import run_lock

    with run_lock(upath(args.out), command=_command(args), wait=args.wait, ray_cfg=cfg.ray) as run_dir:
        path = run_dir / "config.yaml"
        with provisional(path, lambda: C.dump_yaml(cfg, path)):
            yield run_dir


def _command(args: argparse.Namespace) -> str:
    """The command line, as a holder of a run folder names itself to a refused second process."""
    return " ".join(["mars", *getattr(args, "argv", [args.command])])


# -- subcommands --------------------------------------------------------------------------------


def cmd_make_dataset(args: argparse.Namespace) -> int:
    from mars_ray.data.synthetic import make_biased_dataset

    root = make_biased_dataset(
        args.root, n_train=args.n_train, n_val=args.n_val, size=args.size, height=args.height, width=args.width,
        seed=args.seed, cue=args.cue, n_classes=args.n_classes, biased_share=args.biased_share,
        unbiased_classes=args.unbiased_classes, bias_kind=args.bias_kind, image_format=args.image_format,
    )
    print(f"built-in biased dataset written to {root} (pseudo labels in {Path(root) / 'pseudo_labels'})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, build_missing=True)
    with _locked_run(args, cfg) as run_dir:
        stages = pipeline.plan_stages(cfg, args.until)
        pipeline.run_stages(cfg, run_dir, stages)
        print(f"done: {', '.join(stages)} → {run_dir}")
        from mars_ray.report import write_report
        print(f"report: {write_report(run_dir)}")
    return 0


def _run_one(args: argparse.Namespace, name: str, overrides: dict[str, Any]) -> AnyPath:
    cfg = pipeline.build_config(args.config, overrides)
    with _locked_run(args, cfg) as run_dir:
        return pipeline.run_stages(cfg, run_dir, [name])[name]


def _cmd_stage(name: str) -> Callable[[argparse.Namespace], int]:
    def cmd(args: argparse.Namespace) -> int:
        print(f"{name}: {_run_one(args, name, overrides_from_args(args))}")
        return 0

    return cmd


def cmd_train(args: argparse.Namespace) -> int:
    overrides = overrides_from_args(args)
    if args.baseline:
        overrides["train.baseline"] = True
    print(f"train: {_run_one(args, 'train', overrides)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    overrides = overrides_from_args(args, split_key="data.eval_split")  # --split names the evaluated split
    if args.checkpoint:
        overrides["evaluate.checkpoint"] = args.checkpoint
    if args.baseline:
        overrides["train.baseline"] = True
    path = _run_one(args, "evaluate", overrides)  # the table is read after the lock: the stage finished it
    from mars_ray.artifacts import current

    path = current(path)  # the artifact's own folder (an object store keeps it under a prefix)
    print((path / "table.txt").read_text().rstrip())
    print(f"evaluate: {path / 'metrics.json'}")
    return 0


def cmd_evaluate_labels(args: argparse.Namespace) -> int:
    from mars_ray.artifacts import atomic_write_json
    from mars_ray.data.voc import VOCDataset
    from mars_ray.stages import evaluate_labels as EL

    if args.out and args.run:
        raise ValueError("pass --out FILE or --run RUN, not both")
    out = upath(args.out) if args.out else EL.metrics_path(args.run, args.labels) if args.run else None
    if out is not None:  # never into an input: the labels are often someone else's dataset, or read-only
        EL.check_not_inside(out, {"labels": args.labels, "dataset": args.data})
    metrics = EL.evaluate(args.data, args.labels, args.split, biased_as=args.biased_as, pred_ignore=args.pred_ignore)
    if out is not None:
        dataset = VOCDataset(args.data)  # the fingerprint lets `mars report RUN` reuse the result while current
        atomic_write_json(out, {**metrics, "fingerprint": EL.labels_fingerprint(dataset, args.labels, args.split)})
    print(EL.format_table(metrics))
    print(f"mIoU {100 * metrics['miou']:.1f}  FP {100 * metrics['fp']:.1f}  FN {100 * metrics['fn']:.1f}  → "
          + (str(out) if out is not None else "not saved (--out FILE or --run RUN to keep it)"))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mars_ray.report import write_report

    print(f"report: {write_report(args.run, max_images=args.max_images)}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from mars_ray.stages import plan

    cfg = C.build(args.config, C.parse_set(args.set))
    requests = plan.stage_requests(cfg, args.stages.split(",") if args.stages else None)
    placements = plan.place(requests, plan.parse_cluster(args.cluster))
    print(f"cluster {args.cluster}:\n{plan.describe(placements)}")
    if args.address:
        import json

        from mars_ray.stages.runtime import ensure_ray

        ensure_ray(C.RayConfig(address=args.address))
        print(json.dumps(plan.live_placement(requests), indent=2))
    return 0 if all(p.ok for p in placements) else 1


def cmd_tune(args: argparse.Namespace) -> int:
    from mars_ray.tune import run_sweep

    overrides = overrides_from_args(args)
    summary = run_sweep(args.space, args.out, config_file=args.config, overrides=overrides,
                        tracking_uri=args.tracking_uri, experiment=args.experiment, smoke=args.smoke_test,
                        cache=not args.no_cache, verbose=0 if args.quiet else 1, wait=args.wait,
                        command=_command(args))
    print(summary["table"])
    best = summary["best"]
    print(f"best {summary['objective']['metric']} = {best[summary['objective']['metric']]:.4f} at "
          + ", ".join(f"{k}={v}" for k, v in best.items() if k not in ("trial_id", summary['objective']['metric'])))
    if summary.get("reference_note"):
        print(summary["reference_note"])
    print(f"{summary['trials']} trials ({summary['failed']} failed) in {summary['wall_s']}s; "
          f"best config → {summary['best_config']}; MLflow: {summary['tracking_uri']}")
    if summary["artifact_errors"]:
        print(f"mars: warning: {len(summary['artifact_errors'])} MLflow artifact upload(s) failed: "
              f"{summary['artifact_errors'][0]} (all in {summary['results'].rsplit('/', 1)[0]}/summary.json)",
              file=sys.stderr)
    return 1 if summary["failed"] else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mars_ray.demo import run_demo

    from mars_ray.report import write_report
    from mars_ray.runlock import run_lock

    with run_lock(Path(args.out), command=_command(args), wait=args.wait):
        summary = run_demo(Path(args.out), n_train=args.n_train, n_val=args.n_val, size=args.size, seed=args.seed,
                           overrides=C.parse_set(args.set))
        print(summary["table"])
        print(f"report: {write_report(Path(args.out) / 'run')}")
    return 0


# -- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mars", description="MARS biased-object removal on Ray")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print every log line here, Ray's included (they always go to RUN/logs/mars.log)")
    sub = parser.add_subparsers(dest="command", required=True)

    from mars_ray.data.synthetic import BIAS_KINDS, CUES, IMAGE_FORMATS

    p = sub.add_parser("make-dataset", help="write the built-in biased dataset (or a variant of it)")
    p.add_argument("root")
    p.add_argument("--n-train", type=int, default=60)
    p.add_argument("--n-val", type=int, default=20)
    p.add_argument("--size", type=int, default=96, help="square image side in px (default 96)")
    p.add_argument("--height", type=int, default=None, help="image height in px (default: --size)")
    p.add_argument("--width", type=int, default=None, help="image width in px (default: --size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cue", choices=CUES, default="texture",
                   help="what separates an object from its context: texture (default), colour, or both")
    p.add_argument("--n-classes", type=int, default=4, help="object classes, 4 (default) to 12")
    p.add_argument("--biased-share", type=float, default=1.0,
                   help="share of object instances on their co-occurring context, swallowed by the pseudo label "
                        "(default 1.0; the rest sit on generic background)")
    p.add_argument("--unbiased-classes", type=int, default=0,
                   help="the last N classes never sit on their context (classes without bias; default 0)")
    p.add_argument("--bias-kind", choices=BIAS_KINDS, default="context",
                   help="how a biased pseudo label swallows the context (default: context)")
    p.add_argument("--image-format", choices=IMAGE_FORMATS, default="png", help="image files (default png)")
    p.set_defaults(func=cmd_make_dataset)

    p = sub.add_parser("run", help="run the pipeline stages in order")
    _add_config_flags(p)
    p.add_argument("--until", choices=pipeline.PRE_STAGES + pipeline.STAGES, help="stop after this stage")
    p.set_defaults(func=cmd_run)

    for name, help_ in (
        ("wsss", "CAM classifier on Ray Train → pseudo labels RUN/wsss/{id}.png (no pseudo labels of your own)"),
        ("uss", "STEGO-style USS on Ray Train, no labels → RUN/uss/checkpoint.pt (features.extractor=stego)"),
        ("features", "USS features + per-image clustering → RUN/features/centroids.parquet"),
        ("select", "debiased centroids (Eq 1–3) → RUN/select/centroids.npy + report.json"),
        ("debias", "debiased labels (Eq 4–5) → RUN/debias/{id}.png"),
    ):
        p = sub.add_parser(name, help=help_)
        _add_config_flags(p)
        p.set_defaults(func=_cmd_stage(name))

    p = sub.add_parser("train", help="MARS complementing on Ray Train (EMA teacher, CRF fill, W, WCE) → RUN/train/model.pt")
    _add_config_flags(p)
    p.add_argument("--baseline", action="store_true",
                   help="the paper's baseline: plain CE on the pseudo labels Y^b → RUN/train_baseline (train.baseline=true)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="multi-scale (+flip, CRF) predictions of a checkpoint → RUN/evaluate/metrics.json")
    _add_config_flags(p, split_help="split to evaluate (default: val; sets data.eval_split)")
    p.add_argument("--checkpoint", help="segmenter checkpoint (default RUN/train/model.pt; evaluate.checkpoint)")
    p.add_argument("--baseline", action="store_true",
                   help="evaluate RUN/train_baseline/model.pt into RUN/evaluate_baseline (train.baseline=true)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("evaluate-labels", help="mIoU / FP / FN of a label folder against ground truth")
    p.add_argument("--data", required=True, help="dataset root (a folder or a URI)")
    p.add_argument("--labels", required=True, help="folder of label PNGs {id}.png (a folder or a URI)")
    p.add_argument("--split", default="train")
    p.add_argument("--biased-as", choices=("background", "ignore"), default="background")
    p.add_argument("--pred-ignore", choices=("ignore", "background"), default="ignore",
                   help="255 in the evaluated labels: ignored (default) or counted as background (IRN's convention)")
    p.add_argument("--out", help="metrics JSON, a file or a URI (never inside --labels or --data)")
    p.add_argument("--run", help="run folder: write RUN/evaluate_labels/<labels folder name>.json "
                                 "(without --out or --run the metrics are printed only)")
    p.set_defaults(func=cmd_evaluate_labels)

    p = sub.add_parser("report", help="RUN/report/index.html: tables, per-class plots, image grids (static, no server)")
    p.add_argument("run", help="run folder (or URI) holding config.yaml and the stage folders")
    p.add_argument("--max-images", type=int, default=12, help="rows of the image grid (default 12)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("plan", help="the Ray resources each stage asks for, placed on a cluster (docs/scaling.md)")
    p.add_argument("--config", help="YAML config file (e.g. jobs/coco.yaml)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--cluster", default="2x32cpu4gpu", help="nodes, e.g. 2x32cpu4gpu or 32cpu4gpu,16cpu")
    p.add_argument("--stages", help="comma list (default: the stages `mars run` plans for the config)")
    p.add_argument("--address", help="also place them on this running cluster with placement groups (e.g. auto)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("tune", help="Ray Tune sweep over a tune_spaces/*.yaml space, tracked in MLflow")
    p.add_argument("--space", required=True, help="search space YAML (tune_spaces/alpha_kbg.yaml, …)")
    _add_config_flags(p)
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///RUN/mlflow.db; "
                                          "required when --out is an object-store URI)")
    p.add_argument("--experiment", help="MLflow experiment name (default mars-tune-<space>)")
    p.add_argument("--smoke-test", action="store_true", help="the space's small smoke grid")
    p.add_argument("--no-cache", action="store_true", help="recompute features in every trial (for measuring)")
    p.add_argument("--quiet", action="store_true", help="no Tune progress tables")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("demo", help="built-in dataset → debiased labels, with a before/after table")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--n-train", type=int, default=60)
    p.add_argument("--n-val", type=int, default=20)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--wait", action="store_true", help="when another process holds --out, wait for it")
    p.set_defaults(func=cmd_demo)

    _add_ecosystem_commands(sub)
    return parser


# -- inputs from the WSSS / USS ecosystem (issue 13) ---------------------------------------------


def cmd_convert_coco(args: argparse.Namespace) -> int:
    from mars_ray.data.coco import convert_coco, rename_labels

    if args.rename_labels:
        if len(args.paths) != 1 or not args.data:
            raise ValueError("convert-coco --rename-labels LABELS --data ROOT DST: give the dataset and one DST folder")
        n = rename_labels(args.rename_labels, args.paths[0], root=args.data, category_ids=args.category_ids,
                          link=not args.copy)
        print(f"{n} labels renamed to the ids of {args.data} → {args.paths[0]}")
        return 0
    if len(args.paths) == 2:
        src, dst = args.paths
    elif len(args.paths) == 1 and args.images and args.gt:
        src, dst = None, args.paths[0]
    else:
        raise ValueError("convert-coco SRC DST, or convert-coco --images IMAGES --gt GT DST")
    ds = convert_coco(src, dst, images=args.images, gt=args.gt, gt_pattern=args.gt_pattern,
                      category_ids=args.category_ids, splits=args.splits, link=not args.copy)
    sizes = ", ".join(f"{len(ds.ids(s))} {s}" for s in args.splits)
    print(f"{ds.root}: {sizes} images, {ds.num_classes} classes")
    return 0


def cmd_convert_cams(args: argparse.Namespace) -> int:
    from mars_ray.data.cams import PRESETS
    from mars_ray.stages.convert_cams import convert_cams

    preset = dict(PRESETS[args.preset]) if args.preset else {}
    fmt = args.format or preset.get("fmt")
    bg = args.bg_threshold if args.bg_threshold is not None else preset.get("bg_threshold")
    fg = args.fg_threshold if args.fg_threshold is not None else preset.get("fg_threshold")
    if fmt is None or bg is None:
        raise ValueError("convert-cams needs --format and --bg-threshold, or a --preset")
    kwargs = {"split_files": {args.split: args.split_file}} if args.split_file and args.split else None
    report = convert_cams(args.src, args.dst, fmt=fmt, bg_threshold=bg, fg_threshold=fg,
                          crf=args.crf or bool(preset.get("crf")), root=args.data or "", split=args.split or "",
                          dataset_kwargs=kwargs, num_actors=args.num_actors)
    print(f"{report['images']} label PNGs → {args.dst} (format {fmt}, background score {bg}"
          + (f", 255 band up to {fg}" if fg is not None else "") + (f", CRF {report['crf']}" if report["crf"] else "")
          + f"; foreground {100 * report['fg_share']:.1f}%, ignore {100 * report['ignore_share']:.1f}%)")
    return 0


def cmd_convert_labels(args: argparse.Namespace) -> int:
    from mars_ray.data.colormap import convert_colormap_folder

    if not args.from_colormap:
        raise ValueError("convert-labels: say what to convert from (--from-colormap)")
    counts = convert_colormap_folder(args.src, args.dst, palette=args.palette)
    print(f"{counts['colormap']} colour-map and {counts['indices']} index PNGs ({args.palette} palette) → {args.dst}")
    return 0


def cmd_import_uss(args: argparse.Namespace) -> int:
    from mars_ray.models.import_uss import import_uss

    out = import_uss(args.ckpt, args.out, source=args.source, num_heads=args.num_heads, prefix=args.prefix)
    print(f"{args.source} checkpoint imported → {out}; use it with --set features.extractor=stego "
          f"features.checkpoint={out}")
    return 0


def cmd_dump_features(args: argparse.Namespace) -> int:
    from mars_ray.stages.dump_features import dump_features

    overrides = C.parse_set(args.set)
    overrides.update({k: v for k, v in {"data.root": args.data, "data.split": args.split}.items() if v})
    cfg = C.build(args.config, overrides)
    info = dump_features(cfg, args.out, overwrite=args.overwrite)
    print(f"{info['written']} feature files written ({info['skipped']} already there), float16 [{info['dim']}, h, w] "
          f"→ {args.out}; read them back with --features-dir {args.out}")
    return 0


def _add_ecosystem_commands(sub: Any) -> None:
    """``convert-coco``, ``convert-cams``, ``convert-labels``, ``import-uss``, ``dump-features``."""
    from mars_ray.data.cams import CAM_FORMATS, PRESETS
    from mars_ray.data.coco import CATEGORY_IDS, GT_PATTERNS
    from mars_ray.data.colormap import PALETTES

    uss_sources = ("stego", "hp", "leopart")  # models.import_uss.SOURCES, not imported here: it loads torch

    p = sub.add_parser("convert-coco", help="COCO 2014 layouts of WSSS repositories (ToCo, AMN, CLIMS/BECO, coco2voc) "
                                            "→ VOC-style; or rename a label folder to a dataset's ids")
    p.add_argument("paths", nargs="+", metavar="[SRC] DST",
                   help="SRC (train2014/, val2014/, SegmentationClass/) and DST; DST alone with --images/--gt")
    p.add_argument("--images", help="folder holding train2014/ and val2014/ images (AMN: coco_2014/JPEGImages)")
    p.add_argument("--gt", help="GT folder, with {train,val}2014/ or flat (ToCo SegmentationClass, AMN coco_seg_anno, "
                                "CLIMS/BECO mask, coco2voc class_labels)")
    p.add_argument("--gt-pattern", choices=GT_PATTERNS, default="auto",
                   help="GT names: coco = COCO_{split}2014_{012d}, 012d, int; auto tries them in that order")
    p.add_argument("--category-ids", choices=CATEGORY_IDS, default="auto",
                   help="coco91: raw COCO category ids (1..90) → 1..80; auto: remap when a value exceeds 80")
    p.add_argument("--splits", nargs="+", choices=("train", "val"), default=["train", "val"])
    p.add_argument("--rename-labels", metavar="LABELS",
                   help="rename this label folder (000000000009.png, 9.png, …) to the ids of --data into DST")
    p.add_argument("--data", help="converted dataset root (with --rename-labels)")
    p.add_argument("--copy", action="store_true", help="copy files instead of symlinking them")
    p.set_defaults(func=cmd_convert_coco)

    p = sub.add_parser("convert-cams", help="CAM files of IRN/AMN/PSA/MCTformer/ToCo → pseudo-label PNGs "
                                            "(0 background, 1..C, 255 band), on a Ray Data actor pool")
    p.add_argument("src", help="folder of {id}.npy CAM files")
    p.add_argument("dst", help="folder for {id}.png pseudo labels")
    p.add_argument("--format", choices=CAM_FORMATS,
                   help="irn: keys + high_res [K,H,W]; amn: high_res with a background channel first; "
                        "psa: {class_idx: map} (PSA, MCTformer); toco: keys + high_res")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="published settings: irn (0.15), irn-band (0.05/0.30 + CRF), amn (0.25), amn-band "
                        "(0.15/0.45 + CRF), toco-band (0.25/0.70 + CRF); explicit flags win")
    p.add_argument("--bg-threshold", type=float, help="constant background score prepended to the CAMs")
    p.add_argument("--fg-threshold", type=float,
                   help="keep IRN's 255 band: foreground above this score, background below --bg-threshold")
    p.add_argument("--crf", action="store_true", help="the dense CRF the format's repository applies (needs --data)")
    p.add_argument("--data", help="dataset root: images for the CRF, ids for naming the outputs, class count check")
    p.add_argument("--split", help="convert exactly this split (every id needs a CAM file)")
    p.add_argument("--split-file", help="list file of --split (e.g. train_aug.txt outside ImageSets)")
    p.add_argument("--num-actors", type=int, default=1)
    p.set_defaults(func=cmd_convert_cams)

    p = sub.add_parser("convert-labels", help="label PNGs as colour maps (ToCo's RGB predictions) → class indices")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--from-colormap", action="store_true", help="decode RGB colour-map PNGs to indices")
    p.add_argument("--palette", choices=sorted(PALETTES), default="voc", help="voc: 20 classes, coco: 80")
    p.set_defaults(func=cmd_convert_labels)

    p = sub.add_parser("import-uss", help="STEGO .ckpt / HP ckpt.pth / Leopart .ckpt → a features.extractor=stego checkpoint")
    p.add_argument("ckpt")
    p.add_argument("out", help="checkpoint to write (then --set features.checkpoint=OUT)")
    p.add_argument("--from", dest="source", choices=uss_sources, required=True)
    p.add_argument("--num-heads", type=int, help="attention heads when neither config nor width tells (non-standard ViTs)")
    p.add_argument("--prefix", help="Leopart: the state-dict prefix of the ViT when several are stored")
    p.set_defaults(func=cmd_import_uss)

    p = sub.add_parser("dump-features", help="float16 {id}.npz USS features of a split, readable with --features-dir")
    p.add_argument("--data", required=True, help="dataset root (a folder or a URI)")
    p.add_argument("--out", required=True, help="folder for the feature files (a folder or a URI)")
    p.add_argument("--split", help="split to dump (default: data.split)")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="e.g. features.extractor=stego features.checkpoint=CKPT")
    p.add_argument("--overwrite", action="store_true", help="rewrite files that exist (default: skip them)")
    p.set_defaults(func=cmd_dump_features)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    # stage lines and progress here; Ray's logs to RUN/logs, opened once the run folder's lock is ours
    console.setup(args.verbose, _log_dir(args), defer=args.command in (*RUN_COMMANDS, "demo"))
    try:
        return int(args.func(args) or 0)
    except Exception as e:  # noqa: BLE001 - every failure: one line, the full traceback in RUN/logs
        code, line, trace = errors.report_error(e, _run_dir_of(args), argv=args.argv)
        print(trace + line, file=sys.stderr)
        return code
    finally:
        _shutdown_ray()
        console.close()


def _log_dir(args: argparse.Namespace) -> AnyPath | None:
    """``RUN/logs`` of the commands that write into a run folder (``demo``: ``OUT/run/logs``); ``None``
    for the others (their Ray logs stay in Ray's session folder)."""
    if args.command in (*RUN_COMMANDS, "demo"):
        return upath(_run_dir_of(args)) / "logs"
    run = getattr(args, "run", None)  # `report RUN`, `evaluate-labels --run RUN`: a run folder that exists
    return upath(run) / "logs" if run and upath(run).is_dir() else None


def _run_dir_of(args: argparse.Namespace) -> str | None:
    """The run folder a command writes (where its error traceback goes), ``None`` for the others."""
    if args.command == "demo":
        return str(Path(args.out) / "run")
    if args.command == "report":
        return args.run
    return getattr(args, "out", None) if args.command in RUN_COMMANDS else None


def _shutdown_ray() -> None:
    if "mars_ray.stages.runtime" in sys.modules:
        from mars_ray.stages.runtime import shutdown_if_started

        shutdown_if_started()


__all__ = ["main", "build_parser", "config_from_args", "overrides_from_args"]
