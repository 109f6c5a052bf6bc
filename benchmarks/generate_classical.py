"""Seconds per candidate for each classical generator at 512 px (mask ≈ 5 % of the image).

    python benchmarks/generate_classical.py [--runs 7] [--size 512]

Prints the median of several runs per generator (and per Perlin style). Target: ≤ 0.3 s each on
a 2-core CPU at the default 5 % mask; one extra wall-lab row with a 56 % mask shows how the cost
grows with the mask (all work is done in the mask's bounding box). Uses skimage's bundled sample photos, so it needs no network and no dataset.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import classical, masks  # noqa: E402


def _mask_of_fraction(style: str, shape, fraction: float, seed: int) -> np.ndarray:
    """A random mask of ``style`` grown (dilated) until it covers about ``fraction`` of the image."""
    m = masks.random_mask(style, shape, np.random.default_rng(seed))
    target = fraction * shape[0] * shape[1]
    px = 1
    while masks.area(m) > 1.1 * target and masks.area(masks.erode(m, px)) > 0:
        shrunk = masks.erode(m, px)
        if masks.area(shrunk) <= 1.1 * target:
            return shrunk
        px += 1
    while masks.area(m) < target and px < 200:
        grown = masks.dilate(m, px)
        if masks.area(grown) >= target:
            return grown
        px += 1
    return m


def _time(fn, runs: int) -> float:
    fn()                                   # warm-up (imports, caches)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--fraction", type=float, default=0.05)
    args = ap.parse_args(argv)
    size = (args.size, args.size)

    image = cv2.resize(data.coffee(), size, interpolation=cv2.INTER_AREA)
    donor_img = cv2.resize(data.chelsea(), size, interpolation=cv2.INTER_AREA)
    rows: list[tuple[str, float, int]] = []

    perlin = classical.PerlinDefectGenerator()
    for style in masks.STYLES:
        m = _mask_of_fraction(style, size, args.fraction, seed=1)
        rows.append((f"perlin/{style}", _time(lambda: perlin(image, m, seed=0, style=style),
                                               args.runs), masks.area(m)))

    cut = classical.CutPasteGenerator()
    donor_mask = _mask_of_fraction("blob", size, args.fraction, seed=2)
    m = _mask_of_fraction("blob", size, args.fraction, seed=3)
    rows.append(("cutpaste", _time(lambda: cut(image, m, seed=0, donors=[(donor_img, donor_mask)]),
                                   args.runs), masks.area(m)))

    wall = classical.LabRecolorGenerator()
    m = _mask_of_fraction("color", size, args.fraction, seed=4)
    for color in ("#3366cc", "#e8d8b0"):
        rows.append((f"wall-lab/{color}", _time(lambda: wall(image, m, seed=0, color=color),
                                                  args.runs), masks.area(m)))
    big = np.zeros(size, np.uint8)
    big[size[0] // 8: size[0] * 7 // 8, size[1] // 8: size[1] * 7 // 8] = 255
    rows.append(("wall-lab/#3366cc (56% mask)",
                 _time(lambda: wall(image, big, seed=0, color="#3366cc"), args.runs),
                 masks.area(big)))

    n_px = size[0] * size[1]
    print(f"classical generators, {size[1]}×{size[0]} px, median of {args.runs} runs")
    print(f"{'generator':30s} {'mask %':>7s} {'s/candidate':>12s}")
    for name, sec, a in rows:
        at_target_size = a <= 1.5 * args.fraction * n_px
        flag = "  (over the 0.3 s target)" if at_target_size and sec > 0.3 else ""
        print(f"{name:30s} {100 * a / n_px:6.1f}% {sec:12.3f}{flag}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
