"""GPU check of MARS's complementing step (Sec 3.4) with no Ray: the paper's network at jobs/voc.yaml's crop (512, our choice).

DeepLabV3+ / ResNet-101 (output stride 16), crop 512, on one CUDA device. For the same weights and
batch it compares fp32 with AMP (``torch.autocast`` + ``GradScaler``, as ``train_one_epoch`` uses
them on CUDA): the first step's loss must agree to 1 %, every loss must be finite, and the EMA
teacher must move. Then it times, per configuration, plain CE on Y^b (the baseline) against the
teacher + WCE complement step (no CRF: that runs on CPUs per image). Prints one JSON object.

    python benchmarks/gpu_check.py [--batch 16 --crop 512 --steps 20] [--out result.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from mars_ray.algo.complement import ema_update
from mars_ray.engine import baseline_step, build_sgd, complement_step, make_ema_teacher, train_one_epoch
from mars_ray.labels import BIASED, IGNORE
from mars_ray.models.deeplab import deeplabv3plus_resnet101


def _batch(n: int, crop: int, classes: int, device: torch.device, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 3, crop, crop, generator=g)
    label = torch.randint(0, classes, (n, crop // 32, crop // 32), generator=g)
    label = torch.nn.functional.interpolate(label[:, None].float(), size=(crop, crop), mode="nearest")[:, 0].long()
    label[:, : crop // 8] = BIASED
    label[:, -crop // 16:] = IGNORE
    return {"image": image.to(device), "label": label.to(device)}


def _run(model, teacher, batch, steps: int, *, amp: bool, mars: bool, classes: int) -> dict:
    opt = build_sgd(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    if mars:
        def step(b):
            return complement_step(model, teacher, b, num_classes=classes, crf=None)
    else:
        def step(b):
            return baseline_step(model, b)
    model.train()
    train_one_epoch(step, [batch] * 2, opt, scaler=scaler, log_every=0)  # warm-up (cuDNN autotune)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = train_one_epoch(step, [batch] * steps, opt, scaler=scaler, log_every=0,
                          after_step=(lambda i: ema_update(teacher, model, 0.999)) if mars else None)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"loss": out["loss"], "images_per_s": batch["image"].shape[0] * steps / dt,
            "ms_per_step": 1000 * dt / steps, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--crop", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--classes", type=int, default=21)
    ap.add_argument("--out")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device")
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    base = deeplabv3plus_resnet101(num_classes=args.classes).to(dev)
    batch = _batch(args.batch, args.crop, args.classes, dev, seed=1)
    # Without ImageNet weights, BatchNorm's initial running statistics (mean 0, var 1) make the
    # eval-mode teacher of a random ResNet-101 overflow; a few train-mode passes give it the
    # statistics a real (pretrained) network has.
    base.train()
    with torch.no_grad():
        for _ in range(8):
            base(batch["image"])
    from mars_ray.engine import predict_probs

    base.eval()
    res_probs_finite = bool(torch.isfinite(predict_probs(base, batch["image"])).all())
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch,
                 "crop": args.crop, "steps": args.steps, "teacher_probs_finite": res_probs_finite}

    # 1. AMP agrees with fp32 on the first complement step (same weights, same batch, same teacher).
    first = {}
    for amp in (False, True):
        model, teacher = copy.deepcopy(base), make_ema_teacher(base)
        model.train()
        with torch.autocast("cuda", enabled=amp):
            terms = complement_step(model, teacher, batch, num_classes=args.classes, crf=None)
        first["amp" if amp else "fp32"] = float(terms["wce"].detach().float())
    res["first_step_wce"] = first
    res["amp_rel_diff"] = abs(first["amp"] - first["fp32"]) / abs(first["fp32"])

    # 2. Throughput and memory: baseline CE vs complement (teacher + WCE), fp32 and AMP.
    for amp in (False, True):
        for mars in (False, True):
            torch.cuda.reset_peak_memory_stats()
            model, teacher = copy.deepcopy(base), make_ema_teacher(base)
            before = [p.detach().clone() for p in teacher.parameters()][:3]
            r = _run(model, teacher, batch, args.steps, amp=amp, mars=mars, classes=args.classes)
            if mars:
                r["teacher_moved"] = any(not torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
            res[f"{'mars' if mars else 'ce'}_{'amp' if amp else 'fp32'}"] = r
    for prec in ("fp32", "amp"):
        res[f"complement_over_ce_{prec}"] = res[f"ce_{prec}"]["images_per_s"] / res[f"mars_{prec}"]["images_per_s"]
    res["amp_speedup_mars"] = res["mars_amp"]["images_per_s"] / res["mars_fp32"]["images_per_s"]
    ok = (res["teacher_probs_finite"] and res["amp_rel_diff"] < 0.01 and res["mars_amp"]["teacher_moved"]
          and all(res[k]["loss"] == res[k]["loss"] for k in ("ce_fp32", "ce_amp", "mars_fp32", "mars_amp")))
    res["ok"] = bool(ok)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
