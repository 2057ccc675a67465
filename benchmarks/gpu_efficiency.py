"""GPU efficiency of MARS's complement step (Sec 3.4: EMA teacher + WCE) on one CUDA device, no Ray.

The step is ``engine.complement_step`` with ``crf=None`` (the CRF runs on CPUs per image), driven by
``engine.train_one_epoch`` with the EMA update after every step, exactly as a Ray Train worker runs
it. The network is the paper's (DeepLabV3+ / ResNet-101, output stride 16, crop 512, batch 16).

For every variant it reports images/s and the estimated utilisation: model FLOPs per image (counted
by ``torch.utils.flop_counter.FlopCounterMode`` on one real step: teacher forward, student forward
and backward) × images/s ÷ the card's dense bf16 peak (a table keyed by
``torch.cuda.get_device_name()``; ``--peak-tflops`` overrides). Variants, each lever alone on top
of today's setting (AMP fp16 + GradScaler, NCHW, torch's default SGD, batch 16, batches already on
the GPU), then combined:

* precision: fp32 with TF32 off, fp32 with TF32 (matmul + cuDNN), AMP fp16 + GradScaler (today),
  bf16 autocast (no scaler);
* ``channels_last`` memory format; fused SGD (``fused=True``); batch 32 and 64 (if memory allows);
* ``torch.compile`` (mode ``default`` and ``max-autotune-no-cudagraphs``), each in a child process
  with a timeout, so a compile that fails or runs too long is reported as such and costs no more;
* input: a real ``DataLoader`` over synthetic JPEG photos + PNG labels, decoded and augmented
  (``engine.SegAugment``) in N worker processes, pinned memory, ``non_blocking`` copies, against
  the same step on batches already on the GPU; and the loader alone (images/s with no GPU work),
  so it shows whether input is the bottleneck.

Target (issue 14): >= 35 % of the bf16 dense peak for the step. Imports only torch, numpy, Pillow
and mars_ray's pure modules (engine, models, algo); runs from the repository root::

    PYTHONPATH=. python benchmarks/gpu_efficiency.py --max-minutes 8 --out benchmarks/results_gpu_efficiency.json
    PYTHONPATH=. python benchmarks/gpu_efficiency.py --smoke-test          # every variant, tiny, CPU, < 2 min
    PYTHONPATH=. python benchmarks/gpu_efficiency.py --variants bf16_cl_fused_compile_max   # rerun some

Prints a readable table, then one JSON object, also written to ``--out`` (after every variant with
``"partial": true``, so a run stopped from outside keeps what it measured; at the end with
``"partial": false`` and a last line naming the file).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import io
import itertools
import json
import os
import platform
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image

from mars_ray.algo.complement import ema_update
from mars_ray.engine import SegAugment, build_sgd, complement_step, make_ema_teacher, train_one_epoch
from mars_ray.labels import BIASED, IGNORE
from mars_ray.models import deeplab  # noqa: F401 - registers the segmenters
from mars_ray.models.registry import SEGMENTERS

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, in TFLOPS, matched as
# substrings of torch.cuda.get_device_name() in this order (first match wins).
PEAK_BF16_DENSE_TFLOPS: list[tuple[str, float]] = [
    ("H200", 989.4),  # H200 SXM (NVL: 835; pass --peak-tflops)
    ("GH200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # "NVIDIA H100 80GB HBM3" = SXM
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
]
TARGET_UTILISATION = 0.35
EMA_MOMENTUM = 0.999  # paper


@dataclass(frozen=True)
class Variant:
    """One measured configuration of the step."""

    name: str
    lever: str  # what it changes, in words
    precision: str = "fp16"  # fp32 (TF32 off) | tf32 | fp16 (autocast + GradScaler) | bf16 (autocast)
    channels_last: bool = False
    compile: str = ""  # "" eager, else a torch.compile mode
    fused_sgd: bool = False
    batch: int = 16
    loader: bool = False  # DataLoader workers (else batches prepared on the device)


def plan(batch: int, larger: list[int]) -> list[Variant]:
    """The variants in measuring order (the most informative first, should the budget run out).

    ``combined_*`` names are resolved after the eager variants ran: the best eager combination's
    batch is the one compiled and fed by the DataLoader.
    """
    today = Variant("today_fp16", "AMP fp16 + GradScaler (train stage today)", batch=batch)
    out = [
        today,
        dataclasses.replace(today, name="fp32", lever="fp32, TF32 off", precision="fp32"),
        dataclasses.replace(today, name="fp32_tf32", lever="fp32 with TF32 matmul/cuDNN", precision="tf32"),
        dataclasses.replace(today, name="bf16", lever="bf16 autocast, no scaler", precision="bf16"),
        dataclasses.replace(today, name="fp16_channels_last", lever="+ channels_last", channels_last=True),
        dataclasses.replace(today, name="fp16_fused_sgd", lever="+ fused SGD", fused_sgd=True),
    ]
    out += [dataclasses.replace(today, name=f"fp16_b{b}", lever=f"batch {b}", batch=b) for b in larger]
    combo = Variant("bf16_cl_fused", "bf16 + channels_last + fused SGD", precision="bf16", channels_last=True,
                    fused_sgd=True, batch=batch)
    out.append(combo)
    out += [dataclasses.replace(combo, name=f"bf16_cl_fused_b{b}", lever=f"{combo.lever}, batch {b}", batch=b)
            for b in larger]
    out += [
        dataclasses.replace(combo, name="combined_loader", lever="best combination, DataLoader input", loader=True),
        dataclasses.replace(combo, name="combined_compile", lever="best combination + torch.compile default",
                            compile="default"),
        dataclasses.replace(today, name="fp16_compile", lever="+ torch.compile default", compile="default"),
        dataclasses.replace(combo, name="combined_compile_max", lever="best combination + compile max-autotune-no-cudagraphs",
                            compile="max-autotune-no-cudagraphs"),
    ]
    return out


# ------------------------------------------------------------------------------------------ inputs


def _label(n: int, crop: int, classes: int, g: torch.Generator) -> torch.Tensor:
    """Blocky class maps ``[n, crop, crop]`` with a BIASED band and an IGNORE band (as Y^db has)."""
    cells = max(1, crop // 32)
    label = torch.randint(0, classes, (n, 1, cells, cells), generator=g).float()
    label = torch.nn.functional.interpolate(label, size=(crop, crop), mode="nearest")[:, 0].long()
    label[:, : max(1, crop // 8)] = BIASED
    label[:, -max(1, crop // 16):] = IGNORE
    return label


def device_batches(n_distinct: int, batch: int, crop: int, classes: int, device: torch.device,
                   channels_last: bool) -> list[dict[str, torch.Tensor]]:
    """``n_distinct`` training batches already on ``device`` (image float [B,3,H,W] in [0,1], label [B,H,W])."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_distinct):
        image = torch.rand(batch, 3, crop, crop, generator=g).to(device)
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        out.append({"image": image, "label": _label(batch, crop, classes, g).to(device)})
    return out


class SyntheticPhotos(torch.utils.data.Dataset):
    """``n`` photo-like JPEGs (``hw``, smooth colour fields + grain) with PNG label maps, held as bytes;
    each item is decoded (Pillow) and augmented (``SegAugment``: scale, pad, crop, flip) like the
    train stage's input: ``(image uint8 [crop, crop, 3], label uint8 [crop, crop])``."""

    def __init__(self, n: int, hw: tuple[int, int], crop: int, classes: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        h, w = hw
        self.crop = crop
        self.jpegs: list[bytes] = []
        self.pngs: list[bytes] = []
        for _ in range(n):
            coarse = rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
            img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
            img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=90)
            self.jpegs.append(buf.getvalue())
            lab = rng.integers(0, classes, (max(2, h // 48), max(2, w // 48)), dtype=np.uint8)
            lab = np.asarray(Image.fromarray(lab).resize((w, h), Image.Resampling.NEAREST))
            buf = io.BytesIO()
            Image.fromarray(lab).save(buf, format="PNG")
            self.pngs.append(buf.getvalue())
        self.augment = SegAugment(crop, seed=seed)

    def reseed(self, seed: int) -> None:
        self.augment = SegAugment(self.crop, seed=seed)

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = np.asarray(Image.open(io.BytesIO(self.jpegs[i])).convert("RGB"))
        label = np.asarray(Image.open(io.BytesIO(self.pngs[i])))
        out = self.augment.numpy(image, label)
        return torch.from_numpy(out["image_uint8"]), torch.from_numpy(out["label"])


def _reseed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    info.dataset.reseed(1000 + worker_id)


def make_loader(dataset: SyntheticPhotos, batch: int, workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
        drop_last=True, persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_reseed_worker if workers > 0 else None,
    )


def loader_batches(loader: torch.utils.data.DataLoader, device: torch.device, channels_last: bool
                   ) -> Iterator[dict[str, torch.Tensor]]:
    """uint8 NHWC from pinned memory → device (``non_blocking``) → float NCHW in [0, 1] there
    (a quarter of the bytes of a float copy; the permuted view already has channels_last strides)."""
    for image, label in loader:
        x = image.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        yield {"image": x if channels_last else x.contiguous(), "label": label.to(device, non_blocking=True).long()}


def loader_only(dataset: SyntheticPhotos, batch: int, workers: int, seconds: float) -> dict[str, Any]:
    """Images/s of the DataLoader alone (decode + augment + collate + pin; no device work)."""
    loader = make_loader(dataset, batch, workers, torch.device("cpu"))
    it = iter(loader)
    next(it)  # workers started
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        image, _ = next(it)
        n += image.shape[0]
    dt = time.perf_counter() - t0
    del it, loader
    return {"workers": workers, "batch": batch, "images_per_s": n / dt}


# ------------------------------------------------------------------------------------------ measuring


@dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    base_state: dict[str, torch.Tensor]


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    return SEGMENTERS.get(args.model, num_classes=args.classes, output_stride=args.output_stride)


def make_context(args: argparse.Namespace) -> Context:
    """The shared initial weights. A random ResNet's BatchNorm statistics (mean 0, var 1) make the
    eval-mode teacher overflow; a few train-mode passes give it realistic ones (as gpu_check did)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args).to(device)
    model.train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(args.bn_warmup):
            model(torch.rand(min(args.batch, 16), 3, args.crop, args.crop, generator=g).to(device))
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    del model
    return Context(args, device, state)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _precision_flags(precision: str) -> None:
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32  # cuDNN's default is True: "fp32" must switch it off
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


def count_flops(ctx: Context, n: int = 2) -> dict[str, float]:
    """Model FLOPs per image, counted by FlopCounterMode on one real complement step (fp32, eager)."""
    from torch.utils.flop_counter import FlopCounterMode

    args, dev = ctx.args, ctx.device
    model = build_model(args).to(dev)
    model.load_state_dict(ctx.base_state)
    teacher = make_ema_teacher(model)
    model.train()
    batch = device_batches(1, n, args.crop, args.classes, dev, channels_last=False)[0]
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(batch["image"])
    forward = fc.get_total_flops() / n
    with FlopCounterMode(display=False) as fc:
        terms = complement_step(model, teacher, batch, num_classes=args.classes, crf=None)
        terms["wce"].backward()
    step = fc.get_total_flops() / n
    del model, teacher
    return {"forward_gflop_per_image": forward / 1e9, "step_gflop_per_image": step / 1e9,
            "step_over_forward": step / forward}


def _count_host_syncs(fn: Callable[[], Any]) -> int | None:
    """Device→host synchronisations during ``fn()`` (CUDA's sync debug mode), ``None`` off CUDA."""
    if not torch.cuda.is_available():
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def run_variant(v: Variant, ctx: Context) -> dict[str, Any]:
    """Warm up, then time steps of ``v`` until ``--seconds`` (at least ``--min-steps``)."""
    args, dev = ctx.args, ctx.device
    _precision_flags(v.precision)
    torch.manual_seed(0)
    model = build_model(args)
    model.load_state_dict(ctx.base_state)
    model = model.to(dev)
    teacher = make_ema_teacher(model)
    if v.channels_last:
        model = model.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)
    model.train()
    opt = build_sgd(model.param_groups(1e-3), 1e-3, fused=True if v.fused_sgd else None)
    scaler = torch.amp.GradScaler(dev.type) if v.precision == "fp16" else None
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(v.precision)
    student_fn, teacher_fn = model, teacher
    if v.compile:
        student_fn = torch.compile(model, mode=v.compile)
        teacher_fn = torch.compile(teacher, mode=v.compile)

    def step(b: dict[str, torch.Tensor]) -> dict[str, Any]:
        return complement_step(student_fn, teacher_fn, b, num_classes=args.classes, crf=None)

    def after(_: int) -> None:
        ema_update(teacher, model, EMA_MOMENTUM)

    loader = None
    if v.loader:
        dataset = SyntheticPhotos(args.loader_images, tuple(args.loader_hw), args.crop, args.classes)
        loader = make_loader(dataset, v.batch, args.workers, dev)
        source: Iterator[dict[str, torch.Tensor]] = loader_batches(loader, dev, v.channels_last)
    else:
        source = itertools.cycle(device_batches(2, v.batch, args.crop, args.classes, dev, v.channels_last))

    def epoch(n: int) -> dict[str, float]:
        return train_one_epoch(step, itertools.islice(source, n), opt, scaler=scaler, amp_dtype=amp_dtype,
                               after_step=after, log_every=0)

    res: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        epoch(args.warmup)
        _sync(dev)
        res["warmup_s"] = time.perf_counter() - t0  # includes compilation and cuDNN autotuning
        t0 = time.perf_counter()
        epoch(1)
        _sync(dev)
        one = time.perf_counter() - t0
        if v.name == "today_fp16":
            res["host_syncs_per_step"] = _count_host_syncs(lambda: epoch(1))
        steps = int(min(args.max_steps, max(args.min_steps, round(args.seconds / max(one, 1e-6)))))
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        _sync(dev)
        t0 = time.perf_counter()
        out = epoch(steps)
        _sync(dev)
        dt = time.perf_counter() - t0
        res.update(steps=steps, seconds=dt, images_per_s=v.batch * steps / dt, ms_per_step=1000 * dt / steps,
                   loss=out["loss"])
        if dev.type == "cuda":
            res["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    finally:
        del loader, source
    return res


def _child_cmd(v: Variant, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(dataclasses.asdict(v))]
    for k in ("device", "model", "output_stride", "crop", "classes", "batch", "warmup", "seconds", "min_steps",
              "max_steps", "bn_warmup", "workers", "loader_images"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    cmd += ["--loader-hw", *map(str, args.loader_hw)]
    return cmd


def run_in_child(v: Variant, args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    """``run_variant`` in a fresh process (torch.compile: its own caches, killable on a timeout)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(_child_cmd(v, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and its compile workers: nothing else
        proc.communicate()
        return {"error": f"timeout: not done after {timeout:.0f} s (compilation included)",
                "wall_s": time.perf_counter() - t0}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
            res["wall_s"] = time.perf_counter() - t0
            return res
    tail = (err or out).strip().splitlines()[-6:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)[-600:], "wall_s": time.perf_counter() - t0}


def _safe_run(v: Variant, ctx: Context) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        res = run_variant(v, ctx)
    except torch.OutOfMemoryError:
        res = {"error": "out of memory"}
    except Exception as e:  # noqa: BLE001 - a failing variant is a result, the others still run
        res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    res["wall_s"] = time.perf_counter() - t0
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return res


# ------------------------------------------------------------------------------------------ report


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no CUDA device: pass --peak-tflops"
    name = torch.cuda.get_device_name(device)
    for key, tf in PEAK_BF16_DENSE_TFLOPS:
        if key in name:
            return tf, f"table: {key!r} in {name!r} (dense bf16, datasheet)"
    return None, f"{name!r} not in the table: pass --peak-tflops"


def table(results: list[dict[str, Any]]) -> str:
    head = f"{'variant':<22} {'batch':>5} {'img/s':>8} {'ms/step':>8} {'TFLOPS':>7} {'util':>6} {'x today':>7} {'mem GiB':>7}  lever / note"
    lines = [head, "-" * len(head)]
    for r in results:
        if "images_per_s" not in r:
            note = r.get("error") or r.get("skipped") or "?"
            lines.append(f"{r['name']:<22} {r['batch']:>5} {'-':>8} {'-':>8} {'-':>7} {'-':>6} {'-':>7} {'-':>7}  {r['lever']}: {note}")
            continue
        def fmt(k: str, f: str) -> str:
            return format(r[k], f) if r.get(k) is not None else "-"
        util = f"{100 * r['utilisation']:.1f}%" if r.get("utilisation") is not None else "-"
        lines.append(f"{r['name']:<22} {r['batch']:>5} {r['images_per_s']:>8.1f} {r['ms_per_step']:>8.1f} "
                     f"{fmt('tflops', '7.1f'):>7} {util:>6} {fmt('speedup_vs_today', '7.2f'):>7} "
                     f"{fmt('peak_mem_gib', '7.1f'):>7}  {r['lever']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="deeplabv3plus_resnet101")
    ap.add_argument("--output-stride", type=int, default=16)
    ap.add_argument("--crop", type=int, default=512)
    ap.add_argument("--classes", type=int, default=21, help="incl. background (VOC: 21)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--larger-batches", default="32,64", help="comma list ('' for none)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (cuDNN autotune, compile)")
    ap.add_argument("--seconds", type=float, default=5.0, help="timed seconds per variant (steps derived)")
    ap.add_argument("--min-steps", type=int, default=5)
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--bn-warmup", type=int, default=8)
    ap.add_argument("--workers", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 2)),
                    help="DataLoader worker processes")
    ap.add_argument("--loader-images", type=int, default=64, help="distinct synthetic JPEGs")
    ap.add_argument("--loader-hw", type=int, nargs=2, default=[375, 500], help="their height width (VOC-like)")
    ap.add_argument("--loader-seconds", type=float, default=4.0, help="per loader-only measurement")
    ap.add_argument("--compile-timeout", type=float, default=240.0, help="seconds per compiled variant")
    ap.add_argument("--max-minutes", type=float, default=8.0, help="whole run; variants that would not fit are skipped")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device")
    ap.add_argument("--variants", default="", help="comma list of variant names to run (default: all)")
    ap.add_argument("--out", help="write the JSON here too")
    ap.add_argument("--smoke-test", action="store_true", help="every variant at tiny size on CPU (< 2 min)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    if ap.parse_known_args(argv)[0].smoke_test:  # smaller defaults; flags given explicitly still win
        ap.set_defaults(device="cpu", model="deeplab_tiny", crop=64, batch=2, larger_batches="4", warmup=1,
                        seconds=0.3, min_steps=2, max_steps=3, bn_warmup=2, workers=2, loader_images=6,
                        loader_hw=[96, 128], loader_seconds=1.0, compile_timeout=45.0, max_minutes=4.0,
                        peak_tflops=1.0)  # a nominal peak: exercises the utilisation arithmetic
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_efficiency: no CUDA device (use --smoke-test for the CPU check)")
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.backends.cudnn.benchmark = True
    if args.child:  # one variant in a fresh process: print its result as one line
        v = Variant(**json.loads(args.child))
        ctx = make_context(args)
        res = run_variant(v, ctx)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    start = time.perf_counter()
    deadline = start + 60 * args.max_minutes - 10  # 10 s kept for the report
    dev = torch.device(args.device)
    larger = [int(b) for b in args.larger_batches.split(",") if b.strip()]
    peak, peak_source = peak_tflops(dev, args.peak_tflops)
    ctx = make_context(args)
    flops = count_flops(ctx)
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" else None, "python": platform.python_version(),
        "cpus": os.cpu_count(), "model": args.model, "output_stride": args.output_stride, "crop": args.crop,
        "classes": args.classes, "peak_bf16_dense_tflops": peak, "peak_source": peak_source,
        "flops": {**flops, "method": "torch.utils.flop_counter.FlopCounterMode on one complement step "
                                     "(teacher fwd + student fwd + bwd), fp32 eager, per image"},
        "target_utilisation": TARGET_UTILISATION, "smoke_test": args.smoke_test,
    }
    step_flop = flops["step_gflop_per_image"] * 1e9
    print(f"{info['device']}: forward {flops['forward_gflop_per_image']:.1f} GFLOP/image, step "
          f"{flops['step_gflop_per_image']:.1f} GFLOP/image ({flops['step_over_forward']:.2f}x forward); "
          f"peak {peak} TFLOPS ({peak_source})", flush=True)

    # the loader alone, before any variant holds the device
    dataset = SyntheticPhotos(args.loader_images, tuple(args.loader_hw), args.crop, args.classes)
    counts = sorted({max(1, args.workers // 4), args.workers})
    info["loader_only"] = [loader_only(dataset, args.batch, w, args.loader_seconds) for w in counts]
    for r in info["loader_only"]:
        print(f"loader alone: {r['workers']} workers → {r['images_per_s']:.0f} images/s", flush=True)
    del dataset

    chosen = {s.strip() for s in args.variants.split(",") if s.strip()}
    results: list[dict[str, Any]] = []
    by_name: dict[str, dict[str, Any]] = {}
    eager_costs: list[float] = []
    for v in plan(args.batch, larger):
        if v.name.startswith("combined"):  # the best eager combination's batch
            combos = [r for r in results if r["name"].startswith("bf16_cl_fused") and "images_per_s" in r]
            if combos:
                v = dataclasses.replace(v, batch=max(combos, key=lambda r: r["images_per_s"])["batch"])
        if chosen and v.name not in chosen:
            continue
        row: dict[str, Any] = {**dataclasses.asdict(v)}
        left = deadline - time.perf_counter()
        expected = (sum(eager_costs) / len(eager_costs)) if eager_costs else 20.0
        if v.compile:
            if left < 60:
                row["skipped"] = f"budget: {left:.0f} s left of --max-minutes {args.max_minutes:g}"
            else:
                row.update(run_in_child(v, args, timeout=min(args.compile_timeout, left - 5)))
        elif left < expected:
            row["skipped"] = f"budget: {left:.0f} s left, a variant takes ~{expected:.0f} s"
        else:
            row.update(_safe_run(v, ctx))
            eager_costs.append(row["wall_s"])
        if "images_per_s" in row:
            tflops = step_flop * row["images_per_s"] / 1e12
            row["tflops"] = tflops
            row["utilisation"] = tflops / peak if peak else None
            today = by_name.get("today_fp16")
            if today and "images_per_s" in today:
                row["speedup_vs_today"] = row["images_per_s"] / today["images_per_s"]
        if v.name == "today_fp16" and "images_per_s" in row:
            row["speedup_vs_today"] = 1.0
        results.append(row)
        by_name[v.name] = row
        status = (f"{row['images_per_s']:.1f} img/s" if "images_per_s" in row
                  else row.get("error") or row.get("skipped"))
        print(f"[{time.perf_counter() - start:6.0f} s] {v.name}: {status}", flush=True)
        if args.out:  # after every variant: a run killed from outside still leaves what it measured
            _write_json(args.out, {**info, "variants": results, "partial": True})

    done = [r for r in results if "images_per_s" in r]
    best = max(done, key=lambda r: r["images_per_s"]) if done else None
    info["variants"] = results
    info["best"] = best["name"] if best else None
    info["best_utilisation"] = best.get("utilisation") if best else None
    info["target_met"] = bool(best and best.get("utilisation") is not None and best["utilisation"] >= TARGET_UTILISATION)
    loader = by_name.get("combined_loader")
    gpu_in = next((r for r in done if r["name"].startswith("bf16_cl_fused") and loader and r["batch"] == loader["batch"]),
                  None)  # the same step on batches already on the device
    if gpu_in and loader and "images_per_s" in loader:
        info["input_bound"] = {"gpu_tensors_images_per_s": gpu_in["images_per_s"],
                               "dataloader_images_per_s": loader["images_per_s"],
                               "loader_over_gpu_tensors": loader["images_per_s"] / gpu_in["images_per_s"]}
    info["wall_s"] = time.perf_counter() - start
    print()
    print(table(results))
    if best:
        util = f"{100 * best['utilisation']:.1f}% of peak" if best.get("utilisation") is not None else "no peak known"
        print(f"\nbest: {best['name']} {best['images_per_s']:.1f} img/s, {util} "
              f"(target {100 * TARGET_UTILISATION:.0f}%: {'met' if info['target_met'] else 'not met'})")
    info["partial"] = False
    print(json.dumps(info, indent=2))
    if args.out:
        _write_json(args.out, info)
        print(f"\ngpu_efficiency: wrote {os.path.abspath(args.out)}", flush=True)
    return 0


def _write_json(path: str, info: dict[str, Any]) -> None:
    """``info`` as JSON at ``path`` (folders made), replaced atomically."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    raise SystemExit(main())
