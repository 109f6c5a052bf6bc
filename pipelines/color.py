"""Colour utilities for wall-colour mode: hex parsing, LAB, dominant colours, ΔE metrics.

Images are ``H×W×3 uint8`` RGB (sRGB); LAB is CIE L*a*b* (D65) as float64 from
``skimage.color``. Masks are ``H×W`` binary (see :mod:`pipelines.masks`).
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Sequence

import cv2
import numpy as np
from skimage import color as skcolor

from pipelines.masks import MaskError, to_binary

MIN_METRIC_PIXELS = 16
NEUTRAL_CHROMA = 5.0          # LAB chroma below which a target colour counts as grey (no hue)
# Grades of a wall colour (the specification's thresholds; a grade needs all three below):
#   mean per-pixel LAB distance, hue error (degrees), ΔE2000 of the region's mean colour.
GRADES = (("excellent", 5.0, 3.0, 3.0), ("good", 15.0, 10.0, 10.0))
_HEX = re.compile(r"^#?([0-9a-fA-F]{6}|[0-9a-fA-F]{3})$")


def parse_hex(text: str) -> tuple[int, int, int]:
    """``'#RRGGBB'`` (or ``'RRGGBB'``, ``'#RGB'``) → ``(r, g, b)`` ints in 0..255."""
    if not isinstance(text, str) or not _HEX.match(text.strip()):
        raise ValueError(f"Not a colour: {text!r} — use the #RRGGBB form, e.g. #3366cc")
    digits = _HEX.match(text.strip()).group(1)
    if len(digits) == 3:
        digits = "".join(c * 2 for c in digits)
    return tuple(int(digits[i:i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]


def to_hex(rgb: Sequence[float]) -> str:
    """``(r, g, b)`` (0..255) → ``'#rrggbb'``."""
    r, g, b = (int(np.clip(round(float(v)), 0, 255)) for v in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


def as_rgb(color: Any) -> tuple[int, int, int]:
    """A ``'#RRGGBB'`` string or an ``(r, g, b)`` triple → ``(r, g, b)`` ints, else ValueError."""
    if isinstance(color, str):
        return parse_hex(color)
    try:
        vals = [float(v) for v in color]
    except TypeError:
        raise ValueError(f"Not a colour: {color!r} — use #RRGGBB or (r, g, b)") from None
    if len(vals) != 3 or not all(0 <= v <= 255 for v in vals):
        raise ValueError(f"Not a colour: {color!r} — use #RRGGBB or (r, g, b) with values 0..255")
    return tuple(int(round(v)) for v in vals)  # type: ignore[return-value]


def rgb_to_lab(image: Any) -> np.ndarray:
    """RGB (``...×3``) → float64 LAB of the same shape. Integer input is read as 0..255, float
    input as 0..1 (or as 0..255 when its maximum exceeds 1). A single ``(r, g, b)`` triple gives
    a length-3 LAB vector."""
    arr = np.asarray(image)
    if arr.ndim == 0 or arr.shape[-1] != 3:
        raise ValueError(f"expected RGB values with a last axis of 3, got shape {arr.shape}")
    rgb = arr.astype(np.float64)
    if arr.dtype.kind in "iub" or (rgb.size and rgb.max() > 1.0 + 1e-9):
        rgb = rgb / 255.0
    flat = rgb.reshape(-1, 1, 3)
    return skcolor.rgb2lab(flat).reshape(arr.shape)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """LAB (``...×3``) → uint8 RGB (out-of-gamut values clipped)."""
    lab = np.asarray(lab, dtype=np.float64)
    with warnings.catch_warnings():   # skimage warns when out-of-gamut values get clipped
        warnings.simplefilter("ignore", UserWarning)
        rgb = skcolor.lab2rgb(lab.reshape(-1, 1, 3)).reshape(lab.shape)
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                          [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]])
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])


def lab_to_linear_rgb(lab: np.ndarray) -> np.ndarray:
    """LAB (``...×3``) → *unclipped* linear sRGB (same formulas as ``skimage.color.lab2rgb``),
    so out-of-gamut colours show up as values outside [0, 1]."""
    lab = np.asarray(lab, dtype=np.float64)
    fy = (lab[..., 0] + 16.0) / 116.0
    xyz = []
    for f, white in ((fy + lab[..., 1] / 500.0, _WHITE_D65[0]), (fy, 1.0),
                     (np.maximum(fy - lab[..., 2] / 200.0, 0.0), _WHITE_D65[2])):
        xyz.append(np.where(f > 0.2068966, f * f * f, (f - 16.0 / 116.0) / 7.787) * white)
    m = _RGB_FROM_XYZ
    return np.stack([m[i, 0] * xyz[0] + m[i, 1] * xyz[1] + m[i, 2] * xyz[2] for i in range(3)], -1)


def linear_rgb_to_lab(lin: np.ndarray) -> np.ndarray:
    """Linear sRGB (``...×3``) → LAB (the inverse of :func:`lab_to_linear_rgb`)."""
    xyz = np.asarray(lin, dtype=np.float64) @ _XYZ_FROM_RGB.T / _WHITE_D65
    f = np.where(xyz > 0.008856, np.cbrt(np.maximum(xyz, 0.0)), 7.787 * xyz + 16.0 / 116.0)
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]),
                     200.0 * (f[..., 1] - f[..., 2])], axis=-1)


def _in_gamut(lab: np.ndarray, tol: float = 1e-4) -> np.ndarray:
    lin = lab_to_linear_rgb(lab)
    return ((lin >= -tol) & (lin <= 1.0 + tol)).all(axis=-1)


def fit_to_srgb(lab: np.ndarray, steps: int = 8, l_weight: float = 2.0,
                good_enough: float = 0.5) -> np.ndarray:
    """Gamut-map LAB colours into sRGB; in-gamut colours are unchanged.

    Each out-of-gamut colour gets the closer (ΔL weighted by ``l_weight``, to keep shading) of two
    candidates: its linear-RGB channels clipped (best for small excursions — e.g. next to the
    yellow cusp, where constant-hue chroma reduction first leaves the gamut and comes back), or
    its chroma shrunk at constant L and hue angle (found by bisection; best for large
    excursions, where clipping would shift lightness). Clipped colours within ``good_enough``
    of the original skip the bisection."""
    lab = np.array(lab, dtype=np.float64, copy=True)
    flat = lab.reshape(-1, 3)
    flat[:, 0] = np.clip(flat[:, 0], 0.0, 100.0)
    lin = lab_to_linear_rgb(flat)
    out = np.flatnonzero(((lin < -1e-4) | (lin > 1.0 + 1e-4)).any(axis=1))
    if out.size == 0:
        return lab
    w = np.array([l_weight, 1.0, 1.0])
    px = flat[out]
    clipped = linear_rgb_to_lab(np.clip(lin[out], 0.0, 1.0))
    d_clip = np.linalg.norm((clipped - px) * w, axis=1)
    flat[out] = clipped
    hard = np.flatnonzero(d_clip > good_enough)
    if hard.size:
        px = px[hard]
        lo, hi = np.zeros(hard.size), np.ones(hard.size)   # scale 0 (grey) always fits
        for _ in range(steps):
            mid = (lo + hi) / 2.0
            trial = px.copy()
            trial[:, 1:] *= mid[:, None]
            good = _in_gamut(trial)
            lo, hi = np.where(good, mid, lo), np.where(good, hi, mid)
        shrunk = px.copy()
        shrunk[:, 1:] *= lo[:, None]
        use_shrunk = np.linalg.norm((shrunk - px) * w, axis=1) < d_clip[hard]
        flat[out[hard[use_shrunk]]] = shrunk[use_shrunk]
    return lab


def _masked_pixels(image: np.ndarray, mask: Any, min_pixels: int) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] < 3:
        raise ValueError(f"expected an H×W×3 RGB image, got shape {image.shape}")
    m = to_binary(mask)
    if m.shape != image.shape[:2]:
        raise MaskError(f"The mask is {m.shape[1]}×{m.shape[0]} px but the image is "
                        f"{image.shape[1]}×{image.shape[0]} px — repaint it on this image or resize it")
    px = image[..., :3][m > 0]
    if len(px) < min_pixels:
        raise MaskError(f"The mask covers {len(px)} px; at least {min_pixels} px are needed to "
                        "measure a colour — paint the region first")
    return px


def dominant_color(image: np.ndarray, mask: Any, method: str = "median", k: int = 3,
                   max_samples: int = 20_000) -> tuple[int, int, int]:
    """The representative RGB colour of the masked pixels.

    ``median`` / ``mean`` per channel, or ``kmeans``: k-means (k=3, in LAB) and the centre of the
    largest cluster. Deterministic (fixed sub-sampling and seeding).
    """
    px = _masked_pixels(image, mask, 1)
    if method == "median":
        c = np.median(px, axis=0)
    elif method == "mean":
        c = px.mean(axis=0)
    elif method == "kmeans":
        if len(px) > max_samples:
            px = px[np.random.default_rng(0).choice(len(px), max_samples, replace=False)]
        lab = rgb_to_lab(px).astype(np.float32)
        k = int(max(1, min(k, len(np.unique(px, axis=0)))))
        cv2.setRNGSeed(0)
        _, labels, centres = cv2.kmeans(
            lab, k, None, (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 50, 0.1), 3,
            cv2.KMEANS_PP_CENTERS)
        biggest = np.bincount(labels.ravel(), minlength=k).argmax()
        c = lab_to_rgb(centres[biggest].astype(np.float64))
    else:
        raise ValueError(f"unknown method {method!r}; known: median, mean, kmeans")
    return tuple(int(np.clip(round(float(v)), 0, 255)) for v in c)  # type: ignore[return-value]


def solid_reference(rgb: Any, size: int | tuple[int, int] = 512, noise_sigma: float = 8,
                    gradient: tuple[float, float] = (0.95, 1.05), seed: int = 0) -> np.ndarray:
    """A flat patch of colour ``rgb`` with gaussian noise (σ in 0..255 units) and a linear
    left-to-right lighting gradient (multiplier from ``gradient[0]`` to ``gradient[1]``).
    ``size`` is an int (square) or ``(height, width)``. Returns ``H×W×3 uint8``."""
    r, g, b = as_rgb(rgb)
    h, w = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    ramp = np.linspace(gradient[0], gradient[1], w, dtype=np.float32)[None, :, None]
    base = np.array([r, g, b], np.float32)[None, None, :] * ramp
    noise = np.random.default_rng(seed).normal(0.0, noise_sigma, (h, w, 1)).astype(np.float32)
    return np.clip(np.round(base + noise), 0, 255).astype(np.uint8)


def _hue_deg(lab: np.ndarray) -> float:
    return float(np.degrees(np.arctan2(lab[2], lab[1])) % 360.0)


def color_metrics(image: np.ndarray, mask: Any, target_rgb: Any) -> dict[str, float]:
    """How close the masked region of ``image`` is to ``target_rgb`` (masked pixels only).

    Returns ``lab_distance`` (mean per-pixel LAB Euclidean distance to the target),
    ``delta_e76`` / ``delta_e2000`` (target vs. the mean LAB colour of the region),
    ``hue_error_deg`` (circular difference of the LAB hue angles, 0..180; 0 when the target is
    neutral, chroma < :data:`NEUTRAL_CHROMA`, where a hue angle means nothing), ``chroma_diff``
    (the chromatic distance √(Δa² + Δb²) of the region's mean to the target, ≥ 0),
    ``lightness_diff`` (region L − target L), ``mean_lab`` and ``n_pixels``. A mask with fewer
    than 16 px raises :class:`MaskError`. :func:`grade` turns the first three into a grade.
    """
    px = _masked_pixels(image, mask, MIN_METRIC_PIXELS)
    lab = rgb_to_lab(px)
    target = rgb_to_lab(np.array(as_rgb(target_rgb), np.uint8))
    mean_lab = lab.mean(axis=0)
    dh = abs(_hue_deg(mean_lab) - _hue_deg(target)) % 360.0
    if np.hypot(target[1], target[2]) < NEUTRAL_CHROMA:
        dh = 0.0                              # a grey target has no hue to miss
    return {
        "lab_distance": float(np.linalg.norm(lab - target, axis=1).mean()),
        "delta_e76": float(skcolor.deltaE_cie76(mean_lab, target)),
        "delta_e2000": float(skcolor.deltaE_ciede2000(mean_lab, target)),
        "hue_error_deg": float(min(dh, 360.0 - dh)),
        "chroma_diff": float(np.hypot(mean_lab[1] - target[1], mean_lab[2] - target[2])),
        "lightness_diff": float(mean_lab[0] - target[0]),
        "mean_lab": tuple(float(v) for v in mean_lab),
        "n_pixels": int(len(px)),
    }


def grade(metrics: dict) -> str:
    """``'excellent'`` (LAB distance < 5, hue error < 3°, ΔE2000 < 3), ``'good'`` (< 15, < 10°,
    < 10) or ``'poor'``, from :func:`color_metrics`'s ``lab_distance``, ``hue_error_deg`` and
    ``delta_e2000`` (all three must pass)."""
    for name, lab, hue, de in GRADES:
        if (metrics["lab_distance"] < lab and metrics["hue_error_deg"] < hue
                and metrics["delta_e2000"] < de):
            return name
    return "poor"


def passes(metrics: dict, at_least: str = "good") -> bool:
    """Whether :func:`grade` is ``at_least`` (``'good'``: good or excellent)."""
    order = ("poor", "good", "excellent")
    return order.index(grade(metrics)) >= order.index(at_least)
