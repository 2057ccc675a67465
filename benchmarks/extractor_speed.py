"""Speed of the weight-free feature extractors (``FEATURES`` entries that build without a checkpoint).

Per extractor and image size: the best per-image wall time of a forward pass on one CPU thread
(after a warm-up), and its ratio to the budget the ``texture`` extractor was designed for: 50 ms
for a 96 px image, scaled with the pixel count (the extractor is a fixed stack of convolutions).
Extractors that need weights (``stego``) are listed as skipped. Wall-clock numbers depend on the
machine and its load, which is why this is a benchmark and not a test.

    python benchmarks/extractor_speed.py [--sizes 96 256 512] [--repeats 5] [--smoke-test]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mars_ray.models import load_all  # noqa: E402
from mars_ray.models.registry import FEATURES  # noqa: E402

BUDGET_S_AT_96 = 0.05


def _best_time(fn, x: torch.Tensor, repeats: int) -> float:
    fn(x)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[96, 256, 512])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke-test", action="store_true", help="one small size, two repeats")
    args = p.parse_args(argv)
    sizes, repeats = ([96], 2) if args.smoke_test else (args.sizes, args.repeats)
    torch.set_num_threads(1)
    load_all()
    print(f"{'extractor':<16} {'size':>6} {'ms/image':>10} {'budget ms':>10} {'ratio':>7}")
    for name in FEATURES.names():
        try:
            extractor = FEATURES.get(name)
        except (TypeError, ValueError, FileNotFoundError) as e:  # needs a checkpoint or other arguments
            print(f"{name:<16} skipped ({type(e).__name__}: {str(e).splitlines()[0][:60]})")
            continue
        for size in sizes:
            x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                seconds = _best_time(extractor, x, repeats)
            budget = BUDGET_S_AT_96 * (size / 96) ** 2
            print(f"{name:<16} {size:>6} {1000 * seconds:>10.1f} {1000 * budget:>10.1f} {seconds / budget:>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
