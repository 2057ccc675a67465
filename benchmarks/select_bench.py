"""Speed of the debiased-centroid selection (MARS Eq. 1-3): O(N·d) form vs the naive pairwise form.

The fast path scores each foreground centroid against the mean of the normalised background
centroids (``BackgroundMean`` + ``bias_distance``); the naive path builds every fg×bg cosine
(``bias_distance_naive``, in bounded blocks). Both then run the same top-α and class means. The naive
path runs only where its estimated time (linear in N_fg·N_bg from the previous measured size) is under
``--naive-budget`` seconds; beyond, its time is extrapolated linearly in N_fg·N_bg and marked so.

    python benchmarks/select_bench.py [--max-fg 1000000 --max-bg 200000 --d 70] [--smoke-test]
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import numpy as np

from mars_ray.algo.centroids import (
    BackgroundMean,
    bias_distance,
    bias_distance_naive,
    class_means,
    top_alpha_mask,
)


def _timed(fn: Callable[[], Any], min_total: float = 1.0, max_runs: int = 10) -> tuple[float, Any]:
    """Best wall time of ``fn`` over repeats that fill ``min_total`` seconds, and its last result."""
    best, spent, runs = float("inf"), 0.0, 0
    while runs < max_runs and (runs == 0 or spent < min_total):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        best, spent, runs = min(best, dt), spent + dt, runs + 1
    return best, out


def _select(distance: Callable[[], np.ndarray], fg: np.ndarray, cls: np.ndarray, alpha: float, c: int):
    d = distance()
    chosen = top_alpha_mask(d, cls, alpha)
    means, _ = class_means(fg, cls, chosen, c)
    return d, chosen, means


def fast(fg: np.ndarray, cls: np.ndarray, bg: np.ndarray, alpha: float, c: int):
    def distance() -> np.ndarray:
        acc = BackgroundMean()
        acc.add(bg)
        return bias_distance(fg, acc.mean())

    return _select(distance, fg, cls, alpha, c)


def naive(fg: np.ndarray, cls: np.ndarray, bg: np.ndarray, alpha: float, c: int):
    return _select(lambda: bias_distance_naive(fg, bg), fg, cls, alpha, c)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-fg", type=int, default=1_000_000)
    ap.add_argument("--max-bg", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=70)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--alpha", type=float, default=0.4)
    ap.add_argument("--naive-budget", type=float, default=60.0, help="run naive only if estimated below (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke-test", action="store_true", help="two tiny sizes, seconds")
    args = ap.parse_args()
    if args.smoke_test:
        args.max_fg, args.max_bg = 10_000, 2_000

    sizes = [(n, min(n // 5, args.max_bg)) for n in (1_000, 10_000, 100_000, 1_000_000) if n <= args.max_fg]
    if not sizes or sizes[-1] != (args.max_fg, args.max_bg):
        sizes.append((args.max_fg, args.max_bg))

    print(f"d={args.d}, {args.classes} classes, alpha={args.alpha}, float32 inputs, seed={args.seed}")
    print(f"{'N_fg':>9} {'N_bg':>8} {'t_fast s':>10} {'t_naive s':>11} {'naive':>13} {'ratio':>9}  check")
    per_pair: float | None = None  # naive seconds per fg×bg pair, from the largest measured size
    last_both: tuple[int, int, float] | None = None
    for n_fg, n_bg in sizes:
        rng = np.random.default_rng(args.seed)
        fg = rng.standard_normal((n_fg, args.d), dtype=np.float32)
        bg = rng.standard_normal((n_bg, args.d), dtype=np.float32) + 0.5  # a shared bg direction
        cls = rng.integers(1, args.classes + 1, size=n_fg)
        t_fast, (d_fast, ch_fast, _) = _timed(lambda: fast(fg, cls, bg, args.alpha, args.classes))
        estimate = None if per_pair is None else per_pair * n_fg * n_bg
        if estimate is None or estimate < args.naive_budget:
            t_naive, (d_naive, ch_naive, _) = _timed(lambda: naive(fg, cls, bg, args.alpha, args.classes))
            per_pair = t_naive / (n_fg * n_bg)
            err = float(np.max(np.abs(d_fast - d_naive)))
            same = bool(np.array_equal(ch_fast, ch_naive))
            ok = err < 1e-6 and same
            check = f"{'OK' if ok else 'MISMATCH'} max|ΔD|={err:.1e}, same chosen={same}"
            kind = "measured"
            last_both = (n_fg, n_bg, t_naive / t_fast)
            if not ok:
                raise SystemExit(f"fast and naive selections differ at {n_fg}x{n_bg}: {check}")
        else:
            t_naive, kind, check = estimate, "extrapolated", "(naive not run)"
        print(f"{n_fg:>9} {n_bg:>8} {t_fast:>10.4f} {t_naive:>11.2f} {kind:>13} {t_naive / t_fast:>8.0f}x  {check}")
    if last_both:
        print(f"largest size where both ran: {last_both[0]}x{last_both[1]}, fast is {last_both[2]:.0f}x faster")
    print("naive times marked 'extrapolated' are per-pair time of the largest measured size x N_fg x N_bg")


if __name__ == "__main__":
    main()
