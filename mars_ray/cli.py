"""``mars`` command line: one subcommand per stage, ``mars run`` for all of them, ``mars demo``.

The config object is built here (defaults → ``--config`` YAML → ``--set`` → explicit flags) and
handed to the stages; nothing below this module parses arguments.

Run folders (``--out``), ``--config`` files, datasets (``--data``) and label folders may be local
paths or object-store URIs such as ``s3://bucket/run`` (``mars_ray.storage``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from mars_ray import config as C
from mars_ray import storage
from mars_ray.storage import AnyPath, upath

logger = logging.getLogger("mars_ray")

STAGES = ("features", "select", "debias", "train", "evaluate")
PRE_STAGES = ("wsss", "uss")  # built-in WSSS / USS: run first by `mars run` when their inputs are not given


def _stage_module(name: str) -> Any:
    import importlib

    return importlib.import_module(f"mars_ray.stages.{name}")


# -- config from flags --------------------------------------------------------------------------


def _add_config_flags(p: argparse.ArgumentParser, *, out_required: bool = True,
                      split_help: str = "image split to debias (default: train)") -> None:
    p.add_argument("--data", help="dataset root (VOC-style layout; a folder or a URI such as s3://bucket/voc); "
                                  "same as --set data.root=…")
    p.add_argument("--pseudo-labels", help="folder (or URI) of pseudo-label PNGs {id}.png from any WSSS method")
    p.add_argument("--features-dir", help="folder (or URI) of external USS features {id}.npy|npz|pt ([d, h, w])")
    p.add_argument("--uss", action="store_true",
                   help="use the built-in learned USS (features.extractor=stego; `mars run` trains it first)")
    p.add_argument("--split", help=split_help)
    p.add_argument("--out", required=out_required,
                   help="run folder or object-store URI (s3://bucket/run); every stage writes RUN/<stage>/")
    p.add_argument("--config", help="YAML config file, local or a URI (sections data, features, select, debias, ray, …)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides, e.g. select.alpha=0.3")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``--set`` items plus the shorthand flags (``--data``, ``--pseudo-labels``, … , ``--uss``)."""
    overrides: dict[str, Any] = C.parse_set(args.set)
    flags = {"data.root": args.data, "data.pseudo_labels": args.pseudo_labels,
             "data.features_dir": args.features_dir, "data.split": args.split}
    overrides.update({k: v for k, v in flags.items() if v is not None})
    if getattr(args, "uss", False):
        overrides["features.extractor"] = "stego"
    return overrides


def config_from_args(args: argparse.Namespace, *, build_missing: bool = False) -> C.Config:
    """Defaults → ``--config`` → ``--set`` → flags. ``--uss`` means ``features.extractor=stego``.

    ``build_missing`` (``mars run``): with neither pseudo labels nor features given and no extractor
    chosen (``features.extractor`` in neither ``--set`` nor ``--config``), the run builds both —
    CAM pseudo labels (``wsss``) and the learned USS (``features.extractor=stego``, ``uss``).
    """
    overrides = overrides_from_args(args)
    cfg = C.build(args.config, overrides)
    if not cfg.data.root:
        raise ValueError("no dataset: pass --data ROOT (or data.root in --config)")
    chosen = "features.extractor" in overrides or (
        bool(args.config) and "features.extractor" in C.flatten(C.load_yaml(args.config)))
    if build_missing and not cfg.data.pseudo_labels and not cfg.data.features_dir and not chosen:
        cfg = C.merge(cfg, {"features.extractor": "stego"})
    return cfg


def plan_stages(cfg: C.Config, until: str | None = None) -> list[str]:
    """The stages ``mars run`` runs: ``wsss`` when no pseudo labels are given, ``uss`` when the
    features come from the learned ``stego`` extractor without a checkpoint, then ``STAGES``."""
    stages = [] if cfg.data.pseudo_labels else ["wsss"]
    if not cfg.data.features_dir and cfg.features.extractor == "stego" and not cfg.features.checkpoint:
        stages.append("uss")
    stages += list(STAGES)
    if until:
        order = list(PRE_STAGES + STAGES)
        stages = [s for s in stages if order.index(s) <= order.index(until)]
    return stages


def _prepare_run(args: argparse.Namespace, *, build_missing: bool = False) -> tuple[C.Config, AnyPath]:
    cfg = config_from_args(args, build_missing=build_missing)
    run_dir = upath(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    C.dump_yaml(cfg, run_dir / "config.yaml")
    return cfg, run_dir


def run_stages(cfg: C.Config, run_dir: "str | Path | storage.ObjectPath", stages: Sequence[str]) -> dict[str, AnyPath]:
    """Run the named stages in order; each skips itself when its artifact is up to date."""
    run_dir = upath(run_dir)
    out = {}
    for name in stages:
        t0 = time.perf_counter()
        out[name] = _stage_module(name).run(cfg, run_dir)
        logger.info("stage %s done in %.1fs → %s", name, time.perf_counter() - t0, out[name])
    return out


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


def cmd_convert_coco(args: argparse.Namespace) -> int:
    from mars_ray.data.coco import convert_coco

    ds = convert_coco(args.src, args.dst, link=not args.copy)
    print(f"{ds.root}: {len(ds.ids('train'))} train, {len(ds.ids('val'))} val images, {ds.num_classes} classes")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg, run_dir = _prepare_run(args, build_missing=True)
    stages = plan_stages(cfg, args.until)
    run_stages(cfg, run_dir, stages)
    print(f"done: {', '.join(stages)} → {run_dir}")
    return 0


def _cmd_stage(name: str) -> Callable[[argparse.Namespace], int]:
    def cmd(args: argparse.Namespace) -> int:
        cfg, run_dir = _prepare_run(args)
        path = run_stages(cfg, run_dir, [name])[name]
        print(f"{name}: {path}")
        return 0

    return cmd


def cmd_train(args: argparse.Namespace) -> int:
    if args.baseline:
        args.set = [*args.set, "train.baseline=true"]
    return _cmd_stage("train")(args)


def cmd_evaluate(args: argparse.Namespace) -> int:
    extra = {"data.eval_split": args.split, "evaluate.checkpoint": args.checkpoint,
             "train.baseline": "true" if args.baseline else None}
    args.split = None  # --split names the evaluated split here, not data.split
    args.set = [*args.set, *(f"{k}={v}" for k, v in extra.items() if v)]
    cfg, run_dir = _prepare_run(args)
    path = run_stages(cfg, run_dir, ["evaluate"])["evaluate"]
    print((path / "table.txt").read_text().rstrip())
    print(f"evaluate: {path / 'metrics.json'}")
    return 0


def cmd_evaluate_labels(args: argparse.Namespace) -> int:
    from mars_ray.artifacts import atomic_write_json
    from mars_ray.stages.evaluate_labels import evaluate, format_table

    metrics = evaluate(args.data, args.labels, args.split, biased_as=args.biased_as)
    out = upath(args.out) if args.out else upath(args.labels) / "metrics.json"
    atomic_write_json(out, metrics)
    print(format_table(metrics))
    print(f"mIoU {100 * metrics['miou']:.1f}  FP {100 * metrics['fp']:.1f}  FN {100 * metrics['fn']:.1f}  → {out}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from mars_ray.tune import run_sweep

    overrides = overrides_from_args(args)
    summary = run_sweep(args.space, args.out, config_file=args.config, overrides=overrides,
                        tracking_uri=args.tracking_uri, experiment=args.experiment, smoke=args.smoke_test,
                        cache=not args.no_cache, verbose=0 if args.quiet else 1)
    print(summary["table"])
    best = summary["best"]
    print(f"best {summary['objective']['metric']} = {best[summary['objective']['metric']]:.4f} at "
          + ", ".join(f"{k}={v}" for k, v in best.items() if k not in ("trial_id", summary['objective']['metric'])))
    print(f"{summary['trials']} trials ({summary['failed']} failed) in {summary['wall_s']}s; "
          f"best config → {summary['best_config']}; MLflow: {summary['tracking_uri']}")
    return 1 if summary["failed"] else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mars_ray.demo import run_demo

    summary = run_demo(Path(args.out), n_train=args.n_train, n_val=args.n_val, size=args.size, seed=args.seed,
                       overrides=C.parse_set(args.set))
    print(summary["table"])
    return 0


# -- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mars", description="MARS biased-object removal on Ray")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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

    p = sub.add_parser("convert-coco", help="WSSS COCO 2014 layout (train2014/, val2014/, SegmentationClass/) → VOC-style")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--copy", action="store_true", help="copy files instead of symlinking them")
    p.set_defaults(func=cmd_convert_coco)

    p = sub.add_parser("run", help="run the pipeline stages in order")
    _add_config_flags(p)
    p.add_argument("--until", choices=PRE_STAGES + STAGES, help="stop after this stage")
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
    p.add_argument("--out", help="metrics JSON, a file or a URI (default LABELS/metrics.json)")
    p.set_defaults(func=cmd_evaluate_labels)

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
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except Exception as e:  # noqa: BLE001 - user errors get one clear line, the rest a traceback
        user = _user_error(e)
        if user is None:
            raise
        print(f"mars: error: {user}", file=sys.stderr)
        return 2
    finally:
        _shutdown_ray()


def _user_error(e: BaseException) -> BaseException | None:
    """The ``ValueError``/``FileNotFoundError`` behind ``e``, unwrapping Ray's task errors."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ValueError, FileNotFoundError)) and type(e).__module__ == "builtins":
            return e
        cause = getattr(e, "cause", None)  # ray.exceptions.RayTaskError
        e = cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__)
    return None


def _shutdown_ray() -> None:
    if "mars_ray.stages.runtime" in sys.modules:
        from mars_ray.stages.runtime import shutdown_if_started

        shutdown_if_started()


__all__ = ["main", "build_parser", "config_from_args", "plan_stages", "run_stages", "STAGES", "PRE_STAGES"]
