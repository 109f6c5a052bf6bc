"""Mask-aware geometric augmentation: one random transform applied identically to image and mask.

Only geometry (flips, rotation, translation, mild scaling, random crop) — never colour,
brightness, contrast or blur: those would change what a defect looks like, which is exactly what
the generators learn. The image is resampled bilinearly, the mask with nearest-neighbour and
re-thresholded, so it stays ``{0, 255}``. Both use the same reflected border, so a defect that is
mirrored in from the border keeps its mask and the pair never disagrees.

    cfg = AugmentConfig(flip_h=True, flip_v=False, rotate=15)
    img2, mask2 = augment_pair(image, mask, rng, cfg)          # same H×W as the input

``rng`` is a ``numpy.random.Generator`` or an int seed (same seed → same result).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import cv2
import numpy as np

from pipelines import masks as mk


@dataclass
class AugmentConfig:
    flip_h: bool = True          # horizontal flip with p = 0.5 (only if the product allows it)
    flip_v: bool = False         # vertical flip with p = 0.5
    rotate: float = 15.0         # rotation uniform in ±rotate degrees (0 disables; 10–30 typical)
    translate: float = 0.05      # shift uniform in ±translate × side
    scale: tuple[float, float] = (0.9, 1.1)   # isotropic zoom range (mild)
    crop: float = 0.85           # random crop keeping ≥ this fraction of each side, resized back
    p: float = 0.9               # probability of applying the transform at all (flips aside)
    keep_mask: bool = True       # retry (up to 8×) when the transform pushes the defect out

    def __post_init__(self):
        self.scale = tuple(float(s) for s in self.scale)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        if not 0.0 <= float(self.rotate) <= 180.0:
            raise ValueError(f"augment.rotate must be 0..180 degrees, got {self.rotate}")
        if not 0.0 <= float(self.translate) < 0.5:
            raise ValueError(f"augment.translate must be in [0, 0.5), got {self.translate}")
        if len(self.scale) != 2 or not 0.25 <= self.scale[0] <= self.scale[1] <= 4.0:
            raise ValueError(f"augment.scale must be (lo, hi) with 0.25 ≤ lo ≤ hi ≤ 4, got {self.scale}")
        if not 0.1 <= float(self.crop) <= 1.0:
            raise ValueError(f"augment.crop must be in [0.1, 1], got {self.crop}")
        if not 0.0 <= float(self.p) <= 1.0:
            raise ValueError(f"augment.p must be in [0, 1], got {self.p}")

    @classmethod
    def from_dict(cls, d: dict | None) -> "AugmentConfig":
        d = dict(d or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown augment key(s) {', '.join(unknown)}; known keys: {', '.join(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scale"] = list(self.scale)
        return d


def random_affine(shape: tuple[int, int], rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """A 2×3 affine matrix (output ← input) drawn from ``cfg`` for an image of ``shape`` (H, W)."""
    h, w = int(shape[0]), int(shape[1])
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    M = np.eye(3)
    # flips (about the centre)
    if cfg.flip_h and rng.random() < 0.5:
        M = np.array([[-1, 0, 2 * cx], [0, 1, 0], [0, 0, 1.0]]) @ M
    if cfg.flip_v and rng.random() < 0.5:
        M = np.array([[1, 0, 0], [0, -1, 2 * cy], [0, 0, 1.0]]) @ M
    if rng.random() < cfg.p:
        angle = rng.uniform(-cfg.rotate, cfg.rotate) if cfg.rotate > 0 else 0.0
        s = rng.uniform(*cfg.scale)
        R = np.vstack([cv2.getRotationMatrix2D((cx, cy), angle, s), [0, 0, 1.0]])
        tx, ty = rng.uniform(-cfg.translate, cfg.translate, 2) * (w, h)
        M = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1.0]]) @ R @ M
        # random crop: a window of ≥ crop × side, zoomed back to the full size
        if cfg.crop < 1.0:
            f = rng.uniform(cfg.crop, 1.0)
            cw, ch = w * f, h * f
            x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            M = np.array([[w / cw, 0, -x0 * w / cw], [0, h / ch, -y0 * h / ch], [0, 0, 1.0]]) @ M
    return M[:2].astype(np.float64)


def apply_affine(image: np.ndarray, mask: np.ndarray, M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Warp ``image`` (bilinear) and ``mask`` (nearest, binary) with the same 2×3 matrix ``M``."""
    h, w = mask.shape[:2]
    img = cv2.warpAffine(image, M, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    m = cv2.warpAffine(mask, M, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101)
    return img, np.where(m > 127, 255, 0).astype(np.uint8)


def augment_pair(image: np.ndarray, mask: Any, rng: np.random.Generator | int | None = None,
                 cfg: AugmentConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(image, mask)`` → the same random geometric transform applied to both.

    ``image``: ``H×W×C uint8``; ``mask``: anything :func:`pipelines.masks.to_binary` accepts, same
    H×W. Returns ``(H×W×C uint8, H×W uint8 {0,255})``. With ``cfg.keep_mask`` a transform that
    leaves less than a quarter of a non-empty mask in view is redrawn (up to 8 times, then the
    identity is returned).
    """
    cfg = cfg or AugmentConfig()
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    image = np.asarray(image)
    m = mk.to_binary(mask)
    if m.shape != image.shape[:2]:
        raise mk.MaskError(f"The mask is {m.shape[1]}×{m.shape[0]} px but the image is "
                           f"{image.shape[1]}×{image.shape[0]} px")
    area = int(np.count_nonzero(m))
    for _ in range(8):
        img2, m2 = apply_affine(image, m, random_affine(m.shape, rng, cfg))
        if not (cfg.keep_mask and area) or np.count_nonzero(m2) >= max(1, math.ceil(area / 4)):
            return img2, m2
    return image.copy(), m.copy()
