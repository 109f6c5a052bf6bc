"""A defect's appearance relative to its own background: LAB, the background under a defect
(inpainted), and the relative deviation that defect-transfer re-lights on a target and the stroke
profiles are measured from. Shared by :mod:`pipelines.transfer` and
:mod:`pipelines.generators.profiles` (neither imports the other back)."""
from __future__ import annotations

import math

import cv2
import numpy as np

from pipelines.color import rgb_to_lab
from pipelines.generators.base import window

EPS_L = 1.0                  # log((L + 1) / (L_bg + 1)): black pixels do not blow up


def to_lab(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 → float32 CIE LAB."""
    return rgb_to_lab(rgb).astype(np.float32)


def halo(mask: np.ndarray) -> int:
    """Pixels around an annotated defect that still belong to it (rims, lips, shadows)."""
    return int(np.clip(round(2 + 0.05 * math.sqrt(mask.sum())), 2, 8))


window_of = window          # the mask's bounding box grown by a margin (pipelines.generators.base)


def background(rgb: np.ndarray, hole: np.ndarray, smooth: float) -> np.ndarray:
    """The donor's background under ``hole``: Telea inpainting (on a downscaled copy when the hole
    is large — it is smooth anyway), smoothed inside the hole; ``h×w×3 uint8``."""
    if hole.all():                                  # nothing around it to learn from
        return np.broadcast_to(np.median(rgb.reshape(-1, 3), axis=0).astype(np.uint8), rgb.shape).copy()
    h, w = hole.shape
    f = min(1.0, math.sqrt(6000.0 / max(1, int(hole.sum()))))
    src, hl = rgb, hole.astype(np.uint8)
    if f < 1.0:
        size = (max(8, round(w * f)), max(8, round(h * f)))
        src = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        hl = (cv2.resize(hl * 255, size, interpolation=cv2.INTER_AREA) > 0).astype(np.uint8)
    bg = cv2.inpaint(np.ascontiguousarray(src), hl, 5, cv2.INPAINT_TELEA)
    if f < 1.0:
        bg = cv2.resize(bg, (w, h), interpolation=cv2.INTER_LINEAR)
    bg = cv2.GaussianBlur(bg, (0, 0), smooth)
    return np.where(hole[..., None], bg, rgb)


def level_sigma(size: float) -> float:
    """σ (px) of the low-frequency illumination level for a defect ``size`` px long."""
    return float(np.clip(size, 8.0, 120.0))


def deviation(lab: np.ndarray, lab_bg: np.ndarray, level_sigma: float) -> np.ndarray:
    """The relative deviation of ``lab`` from its background ``lab_bg`` (``H×W×3`` LAB each) →
    ``H×W×9 float32`` channels (:data:`CHANNELS`):

    - ``log_l`` = log((L + 1) / (L_bg + 1)): lightness as a ratio;
    - ``log_k``: the chroma change along the background's own hue, as a log ratio (a dark stain
      on copper desaturates copper; on a blue product it desaturates blue), trusted in
      proportion to the background's chroma (not below C = 2, fully above C = 6);
    - ``rest_a``, ``rest_b``: the rest of the a/b change: a hue the defect brings (rust on grey),
      applied in proportion to the illumination gain between donor and target (0.5..2);
    - ``opacity`` (0..1): how strongly the defect differs from the surface (|log_l| or |Δab|/25
      from 0.1 to 0.6, smoothed) — where ``relight="level"`` replaces instead of modulating;
    - ``log_s`` = log((L_bg + 1) / (S_bg + 1)), ``S_bg`` the background blurred by
      ``level_sigma``: the background's structure above its low-frequency level (what the
      ``level`` model puts back so a hole's content is absolute up to that level);
    - ``log_lbg`` = log(L_bg + 1) and ``a_d``, ``b_d`` (the defect's own a/b): levels, not
      changes — for the illumination gain of the chroma and the ``level`` model's colour.
    """
    L, L_bg = np.maximum(lab[..., 0], 0), np.maximum(lab_bg[..., 0], 0)
    dl = np.log((L + EPS_L) / (L_bg + EPS_L))
    ab, ab_bg = lab[..., 1:], lab_bg[..., 1:]
    c_bg = np.sqrt((ab_bg ** 2).sum(-1))
    unit = ab_bg / np.maximum(c_bg, 1e-3)[..., None]
    dab = ab - ab_bg
    trust = np.clip((c_bg - 2.0) / 4.0, 0.0, 1.0)
    along = (dab * unit).sum(-1)
    k = np.clip(1.0 + trust * along / np.maximum(c_bg, 1e-3), 0.25, 2.5)
    rest = dab - ((k - 1.0) * c_bg)[..., None] * unit
    strength = np.maximum(np.abs(dl), np.sqrt((dab ** 2).sum(-1)) / 25.0).astype(np.float32)
    opacity = np.clip((cv2.GaussianBlur(strength, (0, 0), 1.0) - 0.1) / 0.5, 0, 1)
    s_bg = level(lab_bg[..., :1], level_sigma)
    log_s = np.log((L_bg + EPS_L) / (np.maximum(s_bg, 0) + EPS_L))
    return np.concatenate([dl[..., None], np.log(k)[..., None], rest, opacity[..., None],
                           log_s[..., None], np.log(L_bg + EPS_L)[..., None], ab], -1).astype(np.float32)


def level(x: np.ndarray, sigma: float) -> np.ndarray:
    """The low-frequency level of ``x`` (``H×W`` or ``H×W×1``) → ``H×W`` (blurred by ``sigma``;
    a wide blur is done on a copy shrunk so that σ is 4 px, then enlarged)."""
    h, w = x.shape[:2]
    img = x.astype(np.float32).reshape(h, w)
    f = min(1.0, 4.0 / sigma)
    if f < 1.0 and min(h, w) * f >= 4:
        small = cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
        small = cv2.GaussianBlur(small, (0, 0), sigma * f, borderType=cv2.BORDER_REFLECT)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.GaussianBlur(img, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)


__all__ = ["EPS_L", "to_lab", "halo", "window_of", "background", "level_sigma", "deviation", "level"]
