"""The project's own deterministic demo data: two small MVTec-AD-layout categories.

``bottle``        a round glass bottle seen from above (like MVTec AD ``bottle``): dark background,
                  outer glass edge, shoulder, lip rims, dark opening; defects ``broken_large``,
                  ``broken_small``, ``contamination``.
``brushed_metal`` a flat brushed-metal plate; defects ``scratch``, ``crack``, ``stain``.

Every defect is rendered in two steps: its coverage ``alpha`` (H×W in [0, 1]) is computed first,
``mask = alpha >= threshold`` and the defect is composited *only* inside the mask. So the mask is
exact: outside it the defect image equals the good image rendered from the same rng state, and
inside it the pixels change visibly (see ``render_defect(..., return_base=True)``).

Files are byte-for-byte reproducible: every file has its own rng seeded from
``(seed, crc32(product), crc32(split), crc32(label), index)``, so adding a product or changing
one count leaves the other files unchanged. The arithmetic is float64 numpy without BLAS plus
integer OpenCV drawing, so thread counts do not matter and other CPUs are very unlikely to round
a pixel differently; PNG bytes also depend on the (pinned) OpenCV build's zlib.

Run ``python -m pipelines.demo_data OUT_DIR`` to write the default dataset (the committed copy
lives in ``assets/demo``). Pure numpy/OpenCV: never imports gradio or ``studio``.
"""
from __future__ import annotations

import argparse
import os
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import cv2
import numpy as np

PRODUCTS: dict[str, tuple[str, ...]] = {
    "bottle": ("broken_large", "broken_small", "contamination"),
    "brushed_metal": ("scratch", "crack", "stain"),
}
GOOD = "good"
MIN_SIZE, MAX_SIZE = 64, 2048
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 7]  # level 8-9: ~5x slower for 8% smaller
_SS = 4  # supersampling factor for anti-aliased polygons and strokes


# ----------------------------------------------------------------------------------------------
# Small numeric helpers (all float64)
# ----------------------------------------------------------------------------------------------
def _bspline_taps(n_out: int, cell: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Cubic B-spline sampling of control points spaced ``cell`` px apart.

    Returns (idx [n_out x 4] control-point indices, w [n_out x 4] weights, n_ctrl).
    """
    cell = max(float(cell), 1.0)
    n_ctrl = int(np.ceil(n_out / cell)) + 3
    pos = (np.arange(n_out) + 0.5) / cell
    i = np.floor(pos).astype(np.int64)
    t = pos - i
    w = np.stack([(1 - t) ** 3, 3 * t ** 3 - 6 * t ** 2 + 4, -3 * t ** 3 + 3 * t ** 2 + 3 * t + 1,
                  t ** 3], axis=1) / 6.0
    return i[:, None] + np.arange(4), w, n_ctrl


def _noise(rng: np.random.Generator, shape: tuple[int, int], cell: float | tuple[float, float],
           octaves: int = 1, persistence: float = 0.5) -> np.ndarray:
    """Smooth fractal value noise, roughly zero mean / unit std: ``[H x W]``.

    ``cell`` is the feature size in px, or ``(cell_y, cell_x)`` for anisotropic (streak) noise.
    Separable 4-tap B-spline filtering in plain numpy (no BLAS: same bits on every machine).
    """
    h, w = shape
    cy, cx = (cell, cell) if np.isscalar(cell) else cell
    out = np.zeros((h, w))
    amp, total = 1.0, 0.0
    for _ in range(octaves):
        iy, wy, ny = _bspline_taps(h, cy)
        ix, wx, nx = _bspline_taps(w, cx)
        ctrl = rng.standard_normal((ny, nx))
        rows = sum(wy[:, k, None] * ctrl[iy[:, k]] for k in range(4))          # [h x nx]
        layer = sum(rows[:, ix[:, k]] * wx[None, :, k] for k in range(4))      # [h x w]
        # a B-spline shrinks the variance; rescale so each octave has ~unit std
        gain = 1.0 / np.sqrt((wy ** 2).sum(1).mean() * (wx ** 2).sum(1).mean())
        out += (amp * gain) * layer
        total += amp ** 2
        amp *= persistence
        cy, cx = max(cy / 2, 1.0), max(cx / 2, 1.0)
    return out / np.sqrt(total)


def _periodic_noise(rng: np.random.Generator, n: int, smooth: float) -> np.ndarray:
    """1-D periodic noise of length ``n`` (unit std), low-passed with a circular Gaussian."""
    x = rng.standard_normal(n)
    f = np.fft.rfftfreq(n)
    y = np.fft.irfft(np.fft.rfft(x) * np.exp(-0.5 * (f * smooth * 2 * np.pi) ** 2), n)
    return y / max(float(y.std()), 1e-9)


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    return yy + 0.5, xx + 0.5


def _coverage_polygon(size: int, pts_xy: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage [H x W] in [0, 1] of a polygon given in pixel coordinates."""
    canvas = np.zeros((size * _SS, size * _SS), np.uint8)
    p = np.rint(pts_xy * _SS).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(canvas, [p], 255, lineType=cv2.LINE_8)
    return cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA).astype(np.float64) / 255


def _coverage_strokes(size: int, strokes: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Anti-aliased coverage of polylines: each stroke is (points [N x 2] xy, widths [N-1] px)."""
    canvas = np.zeros((size * _SS, size * _SS), np.uint8)
    for pts, widths in strokes:
        p = np.rint(pts * _SS).astype(np.int64)
        for a, b, wid in zip(p[:-1], p[1:], widths):
            th = max(int(round(wid * _SS)), 1)
            cv2.line(canvas, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), 255, th, cv2.LINE_8)
    return cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA).astype(np.float64) / 255


def _blob_field(rng: np.random.Generator, size: int, cx: float, cy: float, radius: float,
                roughness: float = 0.45) -> np.ndarray:
    """Perlin-ish irregular blob: a field that is > 0 inside, ~1 at the centre, < 0 outside."""
    yy, xx = _grid(size)
    aspect = rng.uniform(0.7, 1.0)
    ang = rng.uniform(0, np.pi)
    dx, dy = xx - cx, yy - cy
    u = (dx * np.cos(ang) + dy * np.sin(ang)) / radius
    v = (-dx * np.sin(ang) + dy * np.cos(ang)) / (radius * aspect)
    d = np.sqrt(u * u + v * v)
    n = _noise(rng, (size, size), max(radius * 0.6, 2.0), octaves=3, persistence=0.55)
    return 1.0 - d + roughness * n


def _keep_main(alpha: np.ndarray, threshold: float) -> np.ndarray:
    """Zero the specks of ``alpha``: keep connected parts of at least 15% of the largest one."""
    region = (alpha >= threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(region, connectivity=8)
    if n <= 2:
        return alpha
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.zeros(n, bool)
    keep[1:] = areas >= max(0.15 * areas.max(), 12)
    return np.where(keep[labels], alpha, 0.0)


def _apply(base: np.ndarray, alpha: np.ndarray, target: np.ndarray, threshold: float
           ) -> tuple[np.ndarray, np.ndarray]:
    """Composite ``target`` over ``base`` with ``alpha`` only where ``alpha >= threshold``.

    base: [H x W x 3] uint8, alpha: [H x W] in [0, 1], target: [H x W x 3] float.
    Returns (image uint8, mask uint8 {0, 255}); pixels outside the mask are untouched.
    """
    region = alpha >= threshold
    out = base.copy()
    a = alpha[region][:, None]
    out[region] = _to_u8(base[region].astype(np.float64) * (1 - a) + target[region] * a)
    return out, np.where(region, 255, 0).astype(np.uint8)


def _finish(rng: np.random.Generator, lum: np.ndarray, colour: np.ndarray, sigma0: float,
            gain: float) -> np.ndarray:
    """Luminance [H x W] + sensor noise, plus a per-channel colour offset → uint8 RGB.

    The noise is luminance noise (shared by the channels) and ``colour`` ([H x W x 3] or [3]
    grey-level offsets) is rounded separately, so the channels differ by a smooth field: it
    looks like tinted material under a slightly noisy camera and keeps the PNGs small.
    """
    sigma = sigma0 + gain * np.sqrt(np.maximum(lum, 0.0))
    noisy = np.rint(lum + sigma * rng.standard_normal(lum.shape))
    return _to_u8(noisy[..., None] + np.rint(colour))


# ----------------------------------------------------------------------------------------------
# bottle: a round glass bottle seen from above
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _BottleGeom:
    cx: float
    cy: float
    radius: float        # outer glass edge
    highlight: float     # angle of the main specular arc (rad)


# radial brightness profile of the bottle, r / radius -> grey level (before tint and lighting)
_BOTTLE_PROFILE = np.array([
    (0.00, 66), (0.08, 60), (0.18, 38), (0.30, 24), (0.37, 24), (0.395, 60), (0.415, 150),
    (0.44, 112), (0.49, 122), (0.535, 138), (0.565, 182), (0.595, 104), (0.625, 58), (0.66, 66),
    (0.72, 86), (0.84, 104), (0.92, 126), (0.955, 150), (0.978, 176), (0.995, 70), (1.015, 12),
    (1.2, 10), (3.0, 8)])
_BOTTLE_TINT = np.array([5.0, 2.0, -9.0])  # grey-level offsets: brownish-green glass


def _bottle_good(rng: np.random.Generator, size: int) -> tuple[np.ndarray, _BottleGeom]:
    s = float(size)
    # per-image jitter: the bottle sits a few px off-centre, light and exposure vary a little
    shift = np.clip(rng.normal(0, 0.005 * s, 2), -0.012 * s, 0.012 * s)
    geom = _BottleGeom(cx=s / 2 + shift[0], cy=s / 2 + shift[1],
                       radius=0.455 * s * (1 + rng.normal(0, 0.005)),
                       highlight=-2.2 + rng.normal(0, 0.2))
    bright = 1 + rng.normal(0, 0.03)
    yy, xx = _grid(size)
    dx, dy = xx - geom.cx, yy - geom.cy
    r = np.sqrt(dx * dx + dy * dy) / geom.radius
    th = np.arctan2(dy, dx)

    # 1. radial profile, smoothed in 1-D so the rims are soft but crisp
    rs = np.linspace(0, 1.5, 3001)
    prof = np.interp(rs, _BOTTLE_PROFILE[:, 0], _BOTTLE_PROFILE[:, 1])
    k = np.exp(-0.5 * (np.arange(-30, 31) * (rs[1] / 0.0045)) ** 2)
    prof = np.convolve(np.pad(prof, 30, mode="edge"), k / k.sum(), mode="valid")
    v = np.interp(r, rs, prof)

    # 2. angular structure: lip brightness varies slowly, the shoulder has radial streaks
    n_ang = 1024
    idx = (th + np.pi) / (2 * np.pi) * n_ang
    slow = np.interp(idx, np.arange(n_ang + 1), np.append(a := _periodic_noise(rng, n_ang, 40), a[0]))
    streak = np.interp(idx, np.arange(n_ang + 1), np.append(b := _periodic_noise(rng, n_ang, 2.0), b[0]))
    glass = _smoothstep(0.38, 0.41, r) * (1 - _smoothstep(0.99, 1.01, r))
    shoulder = _smoothstep(0.63, 0.70, r) * (1 - _smoothstep(0.95, 0.99, r))
    v = v * (1 + 0.06 * slow * glass + 0.06 * streak * shoulder)
    v = v + 6.0 * _noise(rng, (size, size), s / 10, octaves=2) * glass

    # 3. ring-light shading: a little brighter towards the highlight side
    dth = np.mod(th - geom.highlight + np.pi, 2 * np.pi) - np.pi
    v = v * (1 + 0.07 * np.cos(dth) * glass) * bright

    # 4. specular highlights: bright arcs on the outer lip, the shoulder and the outer edge
    def arc(r0: float, rw: float, aw: float, amp: float, offset: float = 0.0) -> np.ndarray:
        out = np.zeros_like(r)
        near = np.abs(r - r0) < 4 * rw  # evaluate only the ring where the arc is visible
        d = np.mod(dth[near] - offset + np.pi, 2 * np.pi) - np.pi
        out[near] = amp * np.exp(-0.5 * ((r[near] - r0) / rw) ** 2 - 0.5 * (d / aw) ** 2)
        return out

    hl = (arc(0.56, 0.012, 0.45, 70) + arc(0.80, 0.05, 0.30, 34) + arc(0.975, 0.008, 0.6, 50)
          + arc(0.42, 0.008, 0.35, 45, np.pi) + arc(0.86, 0.03, 0.18, 22, np.pi))
    return _finish(rng, v + hl, _bottle_colour(geom, size), 0.16, 0.048), geom


def _bottle_colour(geom: _BottleGeom, size: int) -> np.ndarray:
    """Per-channel offsets [H x W x 3]: the glass tint, fading out at the bottle's edge."""
    yy, xx = _grid(size)
    r = np.sqrt((xx - geom.cx) ** 2 + (yy - geom.cy) ** 2) / geom.radius
    weight = (0.4 + 0.6 * _smoothstep(0.36, 0.41, r)) * (1 - _smoothstep(0.985, 1.01, r))
    return weight[..., None] * _BOTTLE_TINT


def _bottle_fracture(rng: np.random.Generator, base: np.ndarray, geom: _BottleGeom, *, r_in: float,
                     r_out: float, half_width: float, chip: bool
                     ) -> tuple[np.ndarray, np.ndarray]:
    """A piece of glass broken off the rim: a jagged polygon in polar coordinates.

    The exposed area shows the dark inside of the bottle; the fractured glass along the outline
    is bright and faceted (all round for a ``chip``, else everywhere but towards the opening).
    """
    size = base.shape[0]
    R = geom.radius
    tc = rng.uniform(-np.pi, np.pi)

    def jag(n: int, amp: float) -> np.ndarray:  # sharp random steps, not smooth noise
        return np.cumsum(rng.normal(0, amp, n)) * 0.5 + rng.normal(0, amp, n)

    n_out = max(int(half_width * 2 * r_out * R / 3), 6)
    t_outer = np.linspace(tc - half_width, tc + half_width, n_out)
    r_outer = r_out + jag(n_out, 0.022) * (1 - 0.6 * np.abs(np.linspace(-1, 1, n_out)))
    n_side = 5
    side_a_r = np.linspace(r_in, r_outer[0], n_side + 2)[1:-1]
    side_b_r = np.linspace(r_outer[-1], r_in, n_side + 2)[1:-1]
    side_a_t = tc - half_width + rng.normal(0, 0.12 * half_width, n_side) + np.linspace(0.25, 0, n_side) * half_width
    side_b_t = tc + half_width + rng.normal(0, 0.12 * half_width, n_side) - np.linspace(0, 0.25, n_side) * half_width
    n_in = max(n_out // 2, 4)
    t_inner = np.linspace(tc + half_width * 0.75, tc - half_width * 0.75, n_in)
    r_inner = r_in + (jag(n_in, 0.012) if chip else np.zeros(n_in))
    ts = np.concatenate([t_outer, side_b_t, t_inner, side_a_t])
    rr = np.concatenate([r_outer, side_b_r, r_inner, side_a_r]) * R
    pts = np.stack([geom.cx + rr * np.cos(ts), geom.cy + rr * np.sin(ts)], axis=1)
    cov = _coverage_polygon(size, pts)
    region = cov >= 0.35

    # what shows through: the dark inside of the bottle, with faint glass further down
    yy, xx = _grid(size)
    r = np.sqrt((xx - geom.cx) ** 2 + (yy - geom.cy) ** 2) / R
    dark = 20 + 26 * _smoothstep(0.35, 0.95, r) + 5 * _noise(rng, (size, size), 6.0, octaves=2)

    # bright fractured edge: faceted glass just inside the outline (not along the opening);
    # dist = px to the outline (deterministic 3x3 chamfer distance)
    dist = cv2.distanceTransform(region.astype(np.uint8), cv2.DIST_L2, 3).astype(np.float64)
    width = size / 256 * rng.uniform(1.6, 2.6)
    # a chip is fractured all round; a large break is open towards the bottle's opening
    keep = 1.0 if chip else _smoothstep(r_in + 0.03, r_in + 0.06, r)
    facets = np.clip(0.7 + 0.35 * _noise(rng, (size, size), 2.5 * size / 256), 0.15, 1.0)
    glint = keep * facets * np.exp(-np.maximum(dist - 1, 0) / width)
    haze = keep * 0.25 * np.exp(-dist / (3 * width))  # conchoidal fracture surface, seen edge-on
    lum = dark * (1 - glint) + 232.0 * glint + 60.0 * haze
    fill = _finish(rng, lum, _bottle_colour(geom, size), 0.16, 0.048).astype(np.float64)
    return _apply(base, np.where(region, np.maximum(cov, 0.85), 0.0), fill, 0.35)


def _bottle_defect(rng: np.random.Generator, size: int, damage: str
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    base, geom = _bottle_good(rng, size)
    if damage == "broken_large":
        img, mask = _bottle_fracture(rng, base, geom, r_in=0.395, r_out=rng.uniform(0.66, 0.8),
                                     half_width=rng.uniform(0.32, 0.55), chip=False)
    elif damage == "broken_small":
        img, mask = _bottle_fracture(rng, base, geom, r_in=rng.uniform(0.45, 0.49),
                                     r_out=rng.uniform(0.6, 0.63), half_width=rng.uniform(0.10, 0.17),
                                     chip=True)
    else:  # contamination: a dark brownish irregular blob lying on the glass
        rad = rng.uniform(0.04, 0.08) * size
        rr = rng.uniform(0.45 * geom.radius, 0.92 * geom.radius - rad)
        ang = rng.uniform(-np.pi, np.pi)
        cx, cy = geom.cx + rr * np.cos(ang), geom.cy + rr * np.sin(ang)
        field = _blob_field(rng, size, cx, cy, rad, roughness=0.38)
        body = _noise(rng, (size, size), max(rad / 3, 2.0), octaves=2)
        alpha = _smoothstep(0.0, 0.12, field) * np.clip(0.82 + 0.12 * body, 0.5, 0.97)
        alpha = _keep_main(alpha, 0.2)
        colour = np.array([58.0, 42.0, 26.0]) * (1 + rng.normal(0, 0.15))
        target = colour * (1 + 0.25 * body[..., None]) + 4 * rng.standard_normal((size, size, 1))
        img, mask = _apply(base, alpha, target, 0.2)
    return base, img, mask


# ----------------------------------------------------------------------------------------------
# brushed_metal: a flat brushed plate
# ----------------------------------------------------------------------------------------------
def _metal_good(rng: np.random.Generator, size: int) -> np.ndarray:
    s = float(size)
    level = 148 * (1 + rng.normal(0, 0.025))
    tint = np.array([-2.0, 0.0, 3.0]) + rng.normal(0, 0.4, 3)  # cool steel grey
    pad = int(np.ceil(size * 1.08)) + 2
    fine = _noise(rng, (pad, pad), (1.0, s / 2.5))    # long hair-line streaks
    grain = _noise(rng, (pad, pad), (1.0, s / 40))     # short abrasive grain
    medium = _noise(rng, (pad, pad), (3.0, s / 2))     # wider brushing bands
    streaks = 5.0 * fine + 1.6 * grain + 3.0 * medium
    angle = rng.normal(0, 1.2)  # brushing direction, degrees from horizontal
    rot = cv2.getRotationMatrix2D((pad / 2, pad / 2), angle, 1.0)
    rot[:, 2] -= (pad - size) / 2
    streaks = cv2.warpAffine(streaks, rot, (size, size), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT)

    yy, xx = _grid(size)
    u, v = xx / s - 0.5, yy / s - 0.5
    g = rng.normal(0, 1, 2)
    light = 9.0 * (g[0] * u + g[1] * v)
    # brushed metal reflects a light as a soft band across the brushing direction
    x0 = rng.uniform(0.2, 0.8) - 0.5
    light = light + 16.0 * np.exp(-0.5 * ((u - x0) / 0.22) ** 2)
    blotch = 3.0 * _noise(rng, (size, size), s / 4, octaves=2)
    return _finish(rng, level + light + blotch + streaks, tint, 0.16, 0.04)


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n: int) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def _metal_scratch(rng: np.random.Generator, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = base.shape[0]
    k = size / 256
    length = rng.uniform(0.35, 0.8) * size
    ang = rng.uniform(0, np.pi)
    direction = np.array([np.cos(ang), np.sin(ang)])
    normal = np.array([-direction[1], direction[0]])
    centre = rng.uniform(0.3, 0.7, 2) * size
    bend = rng.normal(0, 0.12) * length
    strokes = []
    for j in range(int(rng.integers(1, 4))):
        off = normal * (j * rng.uniform(3, 7) * k) + direction * rng.normal(0, 0.05 * length)
        ln = length * (1.0 if j == 0 else rng.uniform(0.3, 0.8))
        p0 = centre + off - direction * ln / 2
        p2 = centre + off + direction * ln / 2
        p1 = (p0 + p2) / 2 + normal * bend * (ln / length)
        n = max(int(ln / 2), 8)
        pts = _bezier(p0, p1, p2, n)
        t = np.linspace(0, 1, n - 1)
        width = (rng.uniform(0.9, 1.6) if j == 0 else rng.uniform(0.6, 1.1)) * k
        strokes.append((pts, width * (0.35 + 0.65 * np.sin(np.pi * t) ** 0.5)))
    cov = _coverage_strokes(size, strokes)
    along = 0.7 + 0.3 * np.clip(_noise(rng, (size, size), 8 * k), -1, 1)
    alpha = np.clip(cov * along * 1.15, 0, 1)
    b = base.astype(np.float64)
    if rng.random() < 0.7:  # bright scratch: the groove wall catches the light
        target = np.minimum(b * 1.3 + 30, 245)
    else:                   # dark scratch
        target = b * 0.45
    return _apply(base, alpha, target, 0.3)


def _crack_path(rng: np.random.Generator, start: np.ndarray, heading: float, length: float,
                step: float, wiggle: float) -> np.ndarray:
    n = max(int(length / step), 3)
    pts = [start]
    h = heading
    for _ in range(n):
        h = h + rng.normal(0, wiggle) + 0.4 * (heading - h)  # jagged but going somewhere
        pts.append(pts[-1] + step * rng.uniform(0.6, 1.4) * np.array([np.cos(h), np.sin(h)]))
    return np.array(pts)


def _metal_crack(rng: np.random.Generator, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = base.shape[0]
    k = size / 256
    length = rng.uniform(0.3, 0.55) * size
    heading = rng.uniform(-np.pi, np.pi)
    start = rng.uniform(0.3, 0.7, 2) * size - 0.5 * length * np.array([np.cos(heading), np.sin(heading)])
    start = np.clip(start, 0.05 * size, 0.95 * size)
    main = _crack_path(rng, start, heading, length, 3.0 * k, 0.45)
    n = len(main) - 1
    t = np.linspace(0, 1, n)
    w0 = rng.uniform(1.2, 1.8) * k
    strokes = [(main, w0 * (0.3 + 0.7 * (1 - t) ** 0.6 * np.minimum(1, 8 * t + 0.3)))]
    for _ in range(int(rng.integers(2, 5))):
        i = int(rng.integers(n // 5, n - 2))
        side = rng.choice([-1.0, 1.0])
        h = heading + side * rng.uniform(0.4, 0.9)
        br = _crack_path(rng, main[i], h, rng.uniform(0.15, 0.4) * length, 2.5 * k, 0.45)
        tb = np.linspace(0, 1, len(br) - 1)
        wb = w0 * (0.65 * (1 - t[i]) + 0.3) * (1 - 0.75 * tb)
        strokes.append((br, np.maximum(wb, 0.45 * k)))
    cov = _coverage_strokes(size, strokes)
    alpha = np.clip(cov * 1.2, 0, 1)
    b = base.astype(np.float64)
    target = b * 0.25 + 4
    return _apply(base, alpha, target, 0.3)


def _metal_stain(rng: np.random.Generator, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = base.shape[0]
    rad = rng.uniform(0.09, 0.18) * size
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    field = _blob_field(rng, size, cx, cy, rad, roughness=0.32)
    interior = _noise(rng, (size, size), max(rad / 2.5, 2.0), octaves=2)
    # soft interior, darker "coffee ring" where the liquid dried at the edge
    ring = np.exp(-0.5 * ((field - 0.04) / 0.05) ** 2)
    edge = _smoothstep(0.0, 0.025, field)  # a one-pixel soft rim
    alpha = edge * (0.55 * (0.75 + 0.25 * np.clip(interior, -1.5, 1.5)) + 0.35 * ring)
    alpha = _keep_main(np.clip(alpha, 0.0, 0.95), 0.2)
    # the film is translucent: the brushed texture stays visible through it
    b = base.astype(np.float64)
    kind = int(rng.integers(0, 3))
    if kind == 0:    # rust-brown
        target = b * np.array([1.0, 0.74, 0.52])
    elif kind == 1:  # dark oil / grease
        target = b * np.array([0.56, 0.56, 0.6])
    else:            # dried residue, yellowish white
        target = b * 0.7 + np.array([88.0, 84.0, 60.0])
    return _apply(base, alpha, target, 0.2)


def _metal_defect(rng: np.random.Generator, size: int, damage: str
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    base = _metal_good(rng, size)
    fn = {"scratch": _metal_scratch, "crack": _metal_crack, "stain": _metal_stain}[damage]
    img, mask = fn(rng, base)
    return base, img, mask


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
_GOOD_RENDERERS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "bottle": lambda rng, size: _bottle_good(rng, size)[0],
    "brushed_metal": _metal_good,
}
_DEFECT_RENDERERS: dict[str, Callable[[np.random.Generator, int, str],
                                      tuple[np.ndarray, np.ndarray, np.ndarray]]] = {
    "bottle": _bottle_defect,
    "brushed_metal": _metal_defect,
}


def _check_product(product: str) -> None:
    if product not in PRODUCTS:
        raise ValueError(f"Unknown demo product {product!r}. Known: {', '.join(PRODUCTS)}")


def _check_size(size: int) -> int:
    if not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be an integer in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
    return int(size)


def render_good(product: str, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A defect-free image of ``product``: ``[size x size x 3]`` uint8 RGB."""
    _check_product(product)
    return _GOOD_RENDERERS[product](rng, _check_size(size))


def render_defect(product: str, damage_type: str, rng: np.random.Generator, size: int = 256,
                  return_base: bool = False) -> tuple[np.ndarray, ...]:
    """A defective image and its exact mask.

    Returns ``(image [H x W x 3] uint8 RGB, mask [H x W] uint8 in {0, 255})``, or with
    ``return_base=True`` ``(image, mask, base)`` where ``base`` is the good image the defect was
    painted on — identical to ``render_good(product, rng_copy, size)`` for an rng in the same
    state — and ``image == base`` wherever ``mask == 0``.
    """
    _check_product(product)
    if damage_type not in PRODUCTS[product]:
        raise ValueError(f"Unknown damage type {damage_type!r} for demo product {product!r}. "
                         f"Known: {', '.join(PRODUCTS[product])}")
    base, image, mask = _DEFECT_RENDERERS[product](rng, _check_size(size), damage_type)
    return (image, mask, base) if return_base else (image, mask)


def file_rng(seed: int, product: str, split: str, label: str, index: int) -> np.random.Generator:
    """The rng of one dataset file; independent of every other file, product and count."""
    key = [int(seed), zlib.crc32(product.encode()), zlib.crc32(split.encode()),
           zlib.crc32(label.encode()), int(index)]
    return np.random.default_rng(key)


def _write_png(path: Path, array: np.ndarray) -> None:
    """Write a PNG atomically (temp file + rename). RGB arrays are given in RGB order."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", array, _PNG_PARAMS)
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:  # plain open: the file gets the usual umask permissions
            fh.write(buf.tobytes())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_demo_dataset(out_dir: str | Path, products: Iterable[str] | None = None,
                       n_train_good: int = 30, n_test_good: int = 8, n_test_per_defect: int = 5,
                       size: int = 256, seed: int = 0, workers: int | None = None) -> dict:
    """Write demo categories in the MVTec AD layout and return the file counts.

    Layout, for each product ``P`` and damage type ``D``::

        OUT/P/train/good/000.png            OUT/P/test/good/000.png
        OUT/P/test/D/000.png                OUT/P/ground_truth/D/000_mask.png  (L, 0/255)

    Returns ``{product: {"train": {"good": n}, "test": {"good": n, D: n, ...}}}``.
    Same arguments → byte-identical files (``workers`` only changes the speed). Existing files
    with the same names are overwritten; other files in ``out_dir`` are left alone.
    """
    names = list(PRODUCTS) if products is None else list(dict.fromkeys(products))
    for p in names:
        _check_product(p)
    size = _check_size(size)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    for name, n in (("n_train_good", n_train_good), ("n_test_good", n_test_good),
                    ("n_test_per_defect", n_test_per_defect)):
        if int(n) < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    out = Path(out_dir)

    jobs: list[tuple[str, str, str, int]] = []
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for p in names:
        counts[p] = {"train": {GOOD: int(n_train_good)}, "test": {GOOD: int(n_test_good)}}
        jobs += [(p, "train", GOOD, i) for i in range(n_train_good)]
        jobs += [(p, "test", GOOD, i) for i in range(n_test_good)]
        for d in PRODUCTS[p]:
            counts[p]["test"][d] = int(n_test_per_defect)
            jobs += [(p, "test", d, i) for i in range(n_test_per_defect)]

    def run(job: tuple[str, str, str, int]) -> None:
        p, split, label, i = job
        rng = file_rng(seed, p, split, label, i)
        if label == GOOD:
            _write_png(out / p / split / GOOD / f"{i:03d}.png", render_good(p, rng, size))
        else:
            image, mask = render_defect(p, label, rng, size)
            _write_png(out / p / split / label / f"{i:03d}.png", image)
            _write_png(out / p / "ground_truth" / label / f"{i:03d}_mask.png", mask)

    workers = workers or min(4, os.cpu_count() or 1)
    if workers <= 1:
        for job in jobs:
            run(job)
    else:  # numpy and OpenCV release the GIL for the heavy parts
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, jobs))
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.demo_data",
                                 description="Write the demo MVTec-AD-layout dataset.")
    ap.add_argument("out_dir", help="output folder (e.g. assets/demo)")
    ap.add_argument("--products", nargs="+", choices=list(PRODUCTS), default=None)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train-good", type=int, default=30)
    ap.add_argument("--n-test-good", type=int, default=8)
    ap.add_argument("--n-test-per-defect", type=int, default=5)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    counts = write_demo_dataset(args.out_dir, args.products, args.n_train_good, args.n_test_good,
                                args.n_test_per_defect, size=args.size, seed=args.seed)
    total = sum(n for c in counts.values() for split in c.values() for n in split.values())
    print(f"wrote {total} images of {len(counts)} categories to {args.out_dir} "
          f"in {time.perf_counter() - t0:.1f} s")
    for p, c in counts.items():
        print(f"  {p}: " + ", ".join(f"{s}/{lab}={n}" for s, labs in c.items() for lab, n in labs.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
