"""Measure the near-duplicate guard's distances (pipelines.guard) on MVTec-layout folders.

    python benchmarks/guard_threshold.py assets/demo/bottle ../shared/realdata/transistor

For every image (train/good, test/good, the defects): the distance to the nearest OTHER image of
the folder, and the distance of its JPEG q=90 re-encode, 0.5× resize, resize to 128, 2× upscale,
0.5× resize + JPEG, and of copies with 10 % / 20 % of the area painted. The threshold
(pipelines.guard.NEAR_DUPLICATE_THRESHOLD) must sit between the copies and the other images.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipelines.guard import NEAR_DUPLICATE_THRESHOLD, distances, fingerprint, list_images  # noqa: E402
from pipelines.imageio import read_rgb  # noqa: E402


def jpeg(a, q=90):
    b = io.BytesIO()
    Image.fromarray(a).save(b, "JPEG", quality=q)
    return np.asarray(Image.open(b).convert("RGB"))


def resize(a, w, h):
    return cv2.resize(a, (w, h), interpolation=cv2.INTER_AREA if w < a.shape[1] else cv2.INTER_CUBIC)


def paint(a, frac, rng, flat=False):
    a = a.copy()
    h, w = a.shape[:2]
    s = int(np.sqrt(frac * h * w))
    y, x = ((h - s) // 2, (w - s) // 2) if flat else (rng.integers(0, h - s), rng.integers(0, w - s))
    if flat:
        a[y:y + s, x:x + s] = (255, 0, 255)
    else:
        p = a[y:y + s, x:x + s].astype(np.float32) * 0.5 + rng.normal(0, 20, (s, s, 3))
        a[y:y + s, x:x + s] = np.clip(p, 0, 255).astype(np.uint8)
    return a


def main(folders):
    rng = np.random.default_rng(0)
    copies = {
        "jpeg90": jpeg,
        "half": lambda a: resize(a, a.shape[1] // 2, a.shape[0] // 2),
        "to128": lambda a: resize(a, 128, 128),
        "2x": lambda a: resize(a, a.shape[1] * 2, a.shape[0] * 2),
        "half+jpeg90": lambda a: jpeg(resize(a, a.shape[1] // 2, a.shape[0] // 2)),
        "paint10": lambda a: paint(a, 0.10, rng),
        "flat10": lambda a: paint(a, 0.10, rng, flat=True),
        "paint20": lambda a: paint(a, 0.20, rng),
        "flat20": lambda a: paint(a, 0.20, rng, flat=True),
    }
    for folder in folders:
        folder = Path(folder)
        files = list_images(folder / "train" / "good") + [
            p for d in sorted((folder / "test").iterdir()) if d.is_dir() for p in list_images(d)]
        imgs = [read_rgb(p) for p in files]
        fps = np.stack([fingerprint(a) for a in imgs])
        nearest = []
        for i in range(len(imgs)):
            d = distances(fps[i], fps)
            d[i] = np.inf
            nearest.append(d.min())
        nearest = np.array(nearest)
        print(f"{folder}: {len(files)} images; nearest other image: min {nearest.min():.2f}, "
              f"5th pct {np.quantile(nearest, 0.05):.2f}, median {np.median(nearest):.2f}")
        for name, t in copies.items():
            d = [distances(fingerprint(t(a)), fps[i:i + 1])[0] for i, a in enumerate(imgs)]
            print(f"  {name:12s} max {max(d):.2f}  ({'refused' if max(d) <= NEAR_DUPLICATE_THRESHOLD else 'NOT all refused'})")
    print(f"threshold {NEAR_DUPLICATE_THRESHOLD}")


if __name__ == "__main__":
    main(sys.argv[1:] or [str(Path(__file__).resolve().parent.parent / "assets" / "demo" / "bottle")])
