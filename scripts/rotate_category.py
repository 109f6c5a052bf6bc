"""Randomly rotated development data: a copy of an MVTec-AD-layout category whose train/good AND
test images (and the ground-truth masks with them) are each rotated by its own random angle.

    python scripts/rotate_category.py SRC DST [--seed 0] [--max-angle 180]

Every image file gets one angle drawn from ``numpy.random.default_rng((seed, k))`` (``k`` = the
file's index in sorted path order), uniform in ``[-max_angle, max_angle)`` degrees, and is rotated
about its centre at its own size (``cv2.warpAffine``, bilinear); the corners that the rotation
brings in are filled by reflecting the image (``BORDER_REFLECT_101``: the background's texture
continues, no black wedges that would tell the angle). A test image's mask gets the same angle
(nearest neighbour, corners empty). DST must not exist yet; SRC is only read. Write it to a
temporary folder, never into the repository (benchmarks/patchcore.py --rotate does that for you).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _rotate(img: np.ndarray, angle: float, mask: bool = False) -> np.ndarray:
    h, w = img.shape[:2]
    M = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0)
    if mask:
        return cv2.warpAffine(img, M, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=0)
    return cv2.warpAffine(img, M, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def rotate_category(src: str | Path, dst: str | Path, seed: int = 0, max_angle: float = 180.0) -> dict:
    """Write the rotated copy of ``src`` to ``dst``; returns ``{relative image path: angle}``
    (also written to ``dst/rotation.json`` with the seed)."""
    from pipelines.mvtec import load_category
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise FileExistsError(f"{dst} exists; give a new folder")
    cat = load_category(src)
    files = sorted([*cat.train, *(s.path for s in cat.test)])
    masks = {s.path: s.mask_path for s in cat.test if s.mask_path is not None}
    angles = {}
    for k, path in enumerate(files):
        angle = float(np.random.default_rng((seed, k)).uniform(-max_angle, max_angle))
        rel = path.relative_to(src)
        angles[str(rel)] = angle
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(out), _rotate(img, angle))
        if path in masks:
            m = cv2.imread(str(masks[path]), cv2.IMREAD_UNCHANGED)
            mout = dst / masks[path].relative_to(src)
            mout.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(mout), _rotate(m, angle, mask=True))
    (dst / "rotation.json").write_text(json.dumps({"source": str(src), "seed": seed, "max_angle": max_angle,
                                                   "angles": angles}, indent=1))
    return angles


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-angle", type=float, default=180.0, help="angles uniform in [-A, A) degrees")
    args = ap.parse_args(argv)
    angles = rotate_category(args.src, args.dst, args.seed, args.max_angle)
    print(f"{len(angles)} images rotated (seed {args.seed}) into {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
