"""Mask shapes per damage type: measure real defect masks, fit a model, sample look-alikes.

A crack should get a crack-shaped mask, a broken rim a bite out of the outline. This module
measures the *reference* defect masks of one damage type (:func:`shape_statistics`), fits a
:class:`ShapeModel` on them (:func:`fit_shape_model`) and samples new masks that match those
statistics; a type with no reference mask gets a classic family chosen from its name
(:func:`family_for`, :func:`sample_family`). Pure numpy / OpenCV / scikit-image (no torch).

Conventions (as :mod:`pipelines.masks`)
--------------------------------------
- A mask is ``H×W uint8 {0, 255}`` (inputs may be bool / uint8 / anything
  :func:`pipelines.masks.to_binary` reads). A foreground is ``H×W bool`` (True = the product).
- Every sampler takes ``rng`` (``numpy.random.Generator`` or an int seed): the same seed gives
  the same mask. Samples are never empty and, when a foreground is given, lie inside it.

Statistics (one value per mask; :data:`STAT_NAMES`)
---------------------------------------------------
``area_frac`` mask px / image px · ``extent`` px = 4 √λ1 of the pixel coordinates' covariance
(the length of the major axis) · ``elongation`` √(λ1/λ2) (1 = round) · ``skeleton_length`` px of
the skeleton · ``mean_width`` px = area / skeleton length (the thinness: a 2 px crack has 2) ·
``max_width`` px = twice the largest distance from a mask pixel to the outside (the widest place;
unlike ``mean_width`` not lowered by the spurs of a jagged outline) · ``branch_points`` skeleton
junctions · ``n_blobs``
8-connected parts (≥ 1 % of the area) · ``edge_dist`` distance from the mask to the foreground's
outline / the image's short side (0 = touches it; NaN without a foreground) · ``edge_contact``
1 when it touches the outline · ``inside_frac`` share of the mask on the foreground ·
``pos_x``, ``pos_y`` the centroid in the foreground's bounding box (0..1; the image without one).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.morphology import skeletonize

from pipelines.masks import dilate, to_binary

STAT_NAMES = ("area_frac", "extent", "elongation", "skeleton_length", "mean_width", "max_width",
              "branch_points", "n_blobs", "edge_dist", "edge_contact", "inside_frac", "pos_x",
              "pos_y")
FAMILIES = ("crack", "scratch", "hole", "glyph", "stain", "bite", "edge", "blob")
# family ← keywords (substrings of the lower-cased damage type; the first family that matches wins)
FAMILY_KEYWORDS = (
    ("crack", ("crack",)),
    ("scratch", ("scratch", "scuff", "abrasion")),
    ("hole", ("hole", "dent", "dot", "pit", "poke", "puncture")),
    ("glyph", ("print",)),
    ("stain", ("stain", "contamination", "glue", "oil", "color", "colour", "liquid", "spot")),
    ("bite", ("broken", "missing", "cut", "chip", "damage")),
    ("edge", ("bent", "misplaced")),
)
THIN_RATIO = 6.0        # a mask is thin when its extent / max_width ≥ this


class ShapeError(ValueError):
    """A problem with the masks or foreground given to a shape model (message shown as-is)."""


def _rng(rng: Any) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _hw(shape: Any) -> tuple[int, int]:
    h, w = int(shape[0]), int(shape[1])
    if h < 1 or w < 1:
        raise ShapeError(f"Cannot make a mask of size {w}×{h} px")
    return h, w


def _foreground(foreground: Any, hw: tuple[int, int]) -> np.ndarray | None:
    """``H×W bool`` or None (None / all-True: no outline to respect)."""
    if foreground is None:
        return None
    fg = to_binary(foreground) > 0
    if fg.shape != hw:
        raise ShapeError(f"The foreground is {fg.shape[1]}×{fg.shape[0]} px but the mask is "
                         f"{hw[1]}×{hw[0]} px")
    if not fg.any():
        raise ShapeError("The foreground is empty — there is nowhere to put a defect")
    return None if fg.all() else fg


def _bbox(m: np.ndarray) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` (exclusive ends) of a non-empty boolean array."""
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------
def _branch_points(skel: np.ndarray) -> int:
    """Junctions of a 1-px skeleton: pixels with ≥ 3 crossings (0→1 steps around the 8-ring) or
    ≥ 4 neighbours; adjacent junction pixels count once."""
    p = np.pad(skel, 1).astype(np.int8)
    ring = [p[:-2, 1:-1], p[:-2, 2:], p[1:-1, 2:], p[2:, 2:], p[2:, 1:-1], p[2:, :-2],
            p[1:-1, :-2], p[:-2, :-2]]
    crossings = sum(((ring[i] == 0) & (ring[(i + 1) % 8] == 1)).astype(np.int8) for i in range(8))
    junction = skel & ((crossings >= 3) | (sum(ring) >= 4))
    return int(cv2.connectedComponents(junction.astype(np.uint8), connectivity=8)[0] - 1)


def _n_blobs(m: np.ndarray) -> int:
    n, _, st, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
    sizes = st[1:, cv2.CC_STAT_AREA]
    return max(1, int((sizes >= max(2, 0.01 * sizes.sum())).sum())) if n > 1 else 0


def _axes(m: np.ndarray) -> tuple[float, float]:
    """``(extent, elongation)``: 4 √λ1 and √(λ1/λ2) of the pixel coordinates' covariance (each
    pixel counted as a unit square, so a 1-px line has a finite elongation)."""
    ys, xs = np.nonzero(m)
    ev = np.full(2, 1.0 / 12)
    if xs.size > 1:
        ev += np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(np.float64)))
    return float(4 * np.sqrt(ev[-1])), float(np.sqrt(ev[-1] / ev[0]))


def _max_width(m: np.ndarray) -> float:
    """Twice the largest distance (px) from a mask pixel to the outside (the image edge counts)."""
    d = cv2.distanceTransform(np.pad(m, 1).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return 2.0 * float(d.max())


def _edge_terms(m: np.ndarray, fg: np.ndarray | None) -> tuple[float, float, float]:
    """``(edge_dist, edge_contact, inside_frac)`` of a mask against a foreground."""
    if fg is None:
        return float("nan"), float("nan"), 1.0
    inside = float(np.count_nonzero(m & fg) / max(1, np.count_nonzero(m)))
    d = ndi.distance_transform_edt(fg)          # fg pixels: distance to the nearest outside pixel
    gap = max(0.0, float(d[m].min()) - 1.0)     # 0 = on the outline or across it
    return gap / min(m.shape), float(gap <= 0.5), inside


def measure(mask: Any, foreground: Any = None) -> dict[str, float]:
    """Shape statistics (:data:`STAT_NAMES`) of one ``H×W`` mask, optionally against its
    ``H×W`` foreground. An empty mask raises :class:`ShapeError`."""
    m = to_binary(mask) > 0
    if not m.any():
        raise ShapeError("An empty mask has no shape to measure")
    fg = _foreground(foreground, m.shape)
    skel = skeletonize(m)
    length = max(1, int(np.count_nonzero(skel)))
    n = int(np.count_nonzero(m))
    edge_dist, contact, inside = _edge_terms(m, fg)
    x0, y0, x1, y1 = _bbox(fg) if fg is not None else (0, 0, m.shape[1], m.shape[0])
    ys, xs = np.nonzero(m)
    extent, elongation = _axes(m)
    return {"area_frac": n / m.size, "extent": extent, "elongation": elongation,
            "skeleton_length": float(length), "mean_width": n / length,
            "max_width": _max_width(m),
            "branch_points": float(_branch_points(skel)), "n_blobs": float(_n_blobs(m)),
            "edge_dist": edge_dist, "edge_contact": contact, "inside_frac": inside,
            "pos_x": (xs.mean() + 0.5 - x0) / (x1 - x0),
            "pos_y": (ys.mean() + 0.5 - y0) / (y1 - y0)}


def _per_mask(foregrounds: Any, n: int) -> list:
    """``foregrounds``: None, one ``H×W`` array for every mask, or a list (one per mask)."""
    if foregrounds is None:
        return [None] * n
    if isinstance(foregrounds, np.ndarray) and foregrounds.ndim == 2:
        return [foregrounds] * n
    fgs = list(foregrounds)
    if len(fgs) != n:
        raise ShapeError(f"{len(fgs)} foregrounds for {n} masks: give one, or one per mask")
    return fgs


def shape_statistics(masks: Sequence[Any], foregrounds: Any = None) -> dict[str, np.ndarray]:
    """``{name: float64 [N]}`` for :data:`STAT_NAMES`, one value per mask (``N`` masks)."""
    rows = [measure(m, f) for m, f in zip(masks, _per_mask(foregrounds, len(masks)))]
    return {k: np.array([r[k] for r in rows], np.float64) for k in STAT_NAMES}


def summarize(stats: dict[str, np.ndarray]) -> dict[str, tuple[float, float, float]]:
    """``{name: (median, q25, q75)}`` of :func:`shape_statistics` (NaNs ignored; all-NaN → NaN)."""
    out = {}
    for k, v in stats.items():
        v = v[np.isfinite(v)]
        q = np.percentile(v, [50, 25, 75]) if v.size else np.full(3, np.nan)
        out[k] = tuple(float(x) for x in q)
    return out


# --------------------------------------------------------------------------------------------
# Where the product is
# --------------------------------------------------------------------------------------------
def _disc(r: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _median_image(good_images: Sequence[np.ndarray]) -> np.ndarray:
    """Per-pixel median ``H×W×3 uint8`` of RGB images (resized to the first one's size)."""
    if len(good_images) == 0:
        raise ShapeError("No good images to estimate the product's foreground from")
    first = np.asarray(good_images[0])
    h, w = first.shape[:2]
    stack = []
    for im in good_images:
        im = np.asarray(im, np.uint8)
        im = np.repeat(im[..., None], 3, 2) if im.ndim == 2 else im[..., :3]
        stack.append(im if im.shape[:2] == (h, w) else
                     cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA))
    return np.median(np.stack(stack), axis=0).astype(np.uint8)


def estimate_foreground(good_images: Sequence[np.ndarray], min_contrast: float = 3.0
                        ) -> np.ndarray:
    """Where the product is: ``H×W bool`` from defect-free images ``[H×W×3 uint8]`` of one product.

    The rule: (1) the per-pixel median image; (2) its CIELAB distance ``d`` to the border colour
    (the median colour of a frame 3 % of the short side wide), smoothed (σ = 1 % of the side);
    (3) Otsu's threshold on ``d``; (4) an opening by a disc of 2.5 % of the side removes thin
    structures (grooves, threads, printed lines), the largest part is kept and its holes are
    filled. The result is the whole frame (all True) — a texture, or no clear object — unless
    that part covers 0.5–90 % of the image, touches at most 30 % of the image's border, and stands
    out: ``(mean d on it − mean d on the frame) ≥ min_contrast · (std of d on the frame + 1)``.
    """
    med = _median_image(good_images)
    h, w = med.shape[:2]
    side = min(h, w)
    lab = cv2.cvtColor(med, cv2.COLOR_RGB2LAB).astype(np.float32)
    b = max(1, round(0.03 * side))
    frame = np.ones((h, w), bool)
    frame[b:h - b, b:w - b] = False
    d = np.linalg.norm(lab - np.median(lab[frame], axis=0), axis=2)
    d = cv2.GaussianBlur(d, (0, 0), max(0.5, 0.01 * side))
    full = np.ones((h, w), bool)
    if float(d.max() - d.min()) < 1e-3:
        return full
    raw = (d > threshold_otsu(d)).astype(np.uint8)
    opened = cv2.morphologyEx(raw, cv2.MORPH_OPEN, _disc(max(1, round(0.025 * side))))
    n, labels, st, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    if n < 2:
        return full
    part = ndi.binary_fill_holes(labels == 1 + int(np.argmax(st[1:, cv2.CC_STAT_AREA])))
    edge = np.zeros((h, w), bool)
    edge[[0, -1], :] = edge[:, [0, -1]] = True
    contrast = (d[part].mean() - d[frame].mean()) / (d[frame].std() + 1.0)
    if not (0.005 <= part.mean() <= 0.9 and part[edge].mean() <= 0.3 and contrast >= min_contrast):
        return full
    return part


# --------------------------------------------------------------------------------------------
# Geometry shared by the fitted model and the families
# --------------------------------------------------------------------------------------------
def _outline(fg: np.ndarray) -> np.ndarray:
    """Foreground pixels next to a background pixel (``H×W bool``)."""
    return fg & ~cv2.erode(fg.astype(np.uint8), np.ones((3, 3), np.uint8),
                           borderType=cv2.BORDER_REPLICATE).astype(bool)


def _random_pixel(rng: np.random.Generator, where: np.ndarray) -> np.ndarray:
    """A random ``(x, y)`` float of a non-empty boolean array's True pixels."""
    ys, xs = np.nonzero(where)
    i = int(rng.integers(len(xs)))
    return np.array([xs[i], ys[i]], np.float64)


def _elastic(img: np.ndarray, rng: np.random.Generator, amp: float) -> np.ndarray:
    """Smooth random displacement (a 5×5 grid of normal offsets, bicubic) of ``img [D×D float]``,
    about ``amp`` px at most places."""
    h, w = img.shape
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    dx, dy = (cv2.resize(rng.normal(0, amp, (5, 5)).astype(np.float32), (w, h),
                         interpolation=cv2.INTER_CUBIC) for _ in range(2))
    return cv2.remap(img, gx + dx, gy + dy, cv2.INTER_LINEAR, borderValue=0)


def _warp(crop: np.ndarray, rng: np.random.Generator, scale: float, angle: float, shear: float,
          flip: bool, elastic: float) -> np.ndarray:
    """Random affine (scale, rotation in degrees, shear, mirror) + elastic noise of a boolean crop
    ``[h×w]`` → boolean crop cut to its bounding box (never empty: the brightest pixel stays)."""
    h0, w0 = crop.shape
    extent = np.hypot(h0, w0) * scale * (1 + abs(shear))
    amp = elastic * extent
    size = int(np.ceil(extent + 4 * amp)) + 4
    a = np.deg2rad(angle)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    lin = rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([-scale if flip else scale, scale])
    centre = np.array([(w0 - 1) / 2, (h0 - 1) / 2])
    mat = np.hstack([lin, ((size - 1) / 2 - lin @ centre)[:, None]])
    out = cv2.warpAffine(crop.astype(np.float32), mat, (size, size), flags=cv2.INTER_LINEAR)
    if amp > 0.5:
        out = _elastic(out, rng, amp)
    m = out > 0.5
    if not m.any():
        m = out >= out.max()
    x0, y0, x1, y1 = _bbox(m)
    return m[y0:y1, x0:x1]


def _paste(crop: np.ndarray, centre: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``H×W bool`` with ``crop`` placed so that its centroid lands on ``centre = (x, y)``."""
    ys, xs = np.nonzero(crop)
    ox, oy = (int(round(c - m)) for c, m in zip(centre, (xs.mean(), ys.mean())))
    out = np.zeros(hw, bool)
    h, w = hw
    ch, cw = crop.shape
    x0, y0, x1, y1 = max(0, ox), max(0, oy), min(w, ox + cw), min(h, oy + ch)
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = crop[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
    return out


def _shift(m: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(m)
    h, w = m.shape
    out[max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)] = \
        m[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    return out


def _snap_to_outline(m: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Move a mask that lies wholly on the foreground until its pixel nearest the outline sits
    just outside it (so the mask ∩ foreground touches the outline); others are returned as is."""
    if (m & ~fg).any() or not m.any():
        return m
    dist, (iy, ix) = ndi.distance_transform_edt(fg, return_indices=True)
    ys, xs = np.nonzero(m)
    i = int(np.argmin(dist[ys, xs]))
    return _shift(m, int(iy[ys[i], xs[i]] - ys[i]), int(ix[ys[i], xs[i]] - xs[i]))


def _thicken(skel: np.ndarray, width: float) -> np.ndarray:
    """A 1-px skeleton drawn ``width`` px wide (a disc of that diameter; 2 px = a 2×2 block)."""
    k = max(1, int(round(width)))
    if k == 1:
        return skel.copy()
    return cv2.dilate(skel.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)),
                      borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)


def _fallback(rng: np.random.Generator, hw: tuple[int, int], fg: np.ndarray | None) -> np.ndarray:
    """A small disc at a foreground pixel: the mask of last resort (never empty)."""
    x, y = _random_pixel(rng, fg if fg is not None else np.ones(hw, bool)).astype(int)
    m = np.zeros(hw, np.uint8)
    cv2.circle(m, (int(x), int(y)), max(1, min(hw) // 50), 255, -1)
    m[y, x] = 255
    return m > 0 if fg is None else (m > 0) & fg


def _as_mask(m: np.ndarray) -> np.ndarray:
    return np.where(m, 255, 0).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# The fitted model
# --------------------------------------------------------------------------------------------
@dataclass
class Template:
    """One reference mask as the model keeps it."""
    crop: np.ndarray            # [h x w] bool: the mask cut to its bounding box
    pos_image: tuple[float, float]              # centroid (x, y) / image (width, height)
    pos_fg: tuple[float, float] | None          # centroid in its foreground's bbox (None: none)
    side: int                   # short side of its image (px)
    area: int                   # px
    length: float               # skeleton px
    touches: bool               # it touches its foreground's outline
    thin: bool                  # extent / max_width ≥ THIN_RATIO: redrawn from its skeleton


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    lo, hi = max(lo, 1e-9), max(hi, lo * 1.0001, 1e-9)
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


@dataclass
class ShapeModel:
    """Masks shaped like the reference masks of one damage type (see :func:`fit_shape_model`).

    A sample: pick a reference mask (a template) and mirror it at random; scale it so that its
    area fraction (a thin template: its skeleton length / the image's short side) falls in the
    range observed on the references of its kind (thin or not), widened to 0.8× min .. 1.25× max;
    rotate it (± ``max_rotation`` degrees in place, any angle when placed anywhere), shear it and
    add elastic boundary noise; a thin template is then re-skeletonised and redrawn at a width
    drawn from the thin references' widths (so scaling never fattens a crack). Place it at its
    template's position (in the foreground's bounding box when both the fit and the sample have a
    foreground, else in the image), jittered — or, with probability ``p_anywhere``, at any
    foreground pixel (a template that touches its outline: any outline pixel); move it onto the
    outline when its template touches it; cut it to the foreground. A try of which less than
    half survives the cut is redrawn (12 tries; then the largest one, then a small disc).
    """
    templates: list[Template]
    stats: dict[str, np.ndarray]        # the references' shape_statistics, [N] each
    p_anywhere: float = 0.25
    max_rotation: float = 15.0
    shear: float = 0.15
    elastic: float = 0.03
    position_jitter: float = 0.03       # std of the position, fraction of the foreground bbox

    @property
    def thin(self) -> bool:
        """Whether most references are thin (extent / max_width ≥ :data:`THIN_RATIO`)."""
        return float(np.mean([t.thin for t in self.templates])) > 0.5

    @property
    def edge(self) -> float:
        """Share of the references that touch the foreground's outline (their samples do too)."""
        return float(np.mean([t.touches for t in self.templates]))

    @property
    def on_product(self) -> bool:
        """Whether the references lie on the foreground they were fitted with (median share
        ≥ 0.9). When False (the foreground misses where this type occurs: a transistor's leads
        when only its body was found), sample without one."""
        return bool(np.median(self.stats["inside_frac"]) >= 0.9)

    def _range(self, name: str, thin: bool, per_side: bool, lo: float = 0.8, hi: float = 1.25
               ) -> tuple[float, float]:
        """``(lo · min, hi · max)`` of a statistic (``width``: min(mean_width, max_width)) over
        the thin / not thin references (per image short side when ``per_side``)."""
        v = (np.minimum(self.stats["mean_width"], self.stats["max_width"]) if name == "width"
             else self.stats[name])
        if per_side:
            v = v / np.array([t.side for t in self.templates])
        v = v[np.array([t.thin == thin for t in self.templates])]
        return lo * float(v.min()), hi * float(v.max())

    def _transform(self, t: Template, rng: np.random.Generator, hw: tuple[int, int],
                   anywhere: bool) -> np.ndarray:
        """The template warped for an ``H×W`` target → boolean crop."""
        side = min(hw)
        flip = bool(rng.random() < 0.5)
        angle = rng.uniform(-180, 180) if anywhere else rng.uniform(-1, 1) * self.max_rotation
        shear = rng.uniform(-1, 1) * self.shear
        if t.thin:
            scale = _log_uniform(rng, *self._range("skeleton_length", True, True)) * side / t.length
            crop = dilate(np.pad(t.crop, 2), 1) > 0       # survives down-scaling
        else:
            lo, hi = self._range("area_frac", False, False)
            scale = np.sqrt(_log_uniform(rng, lo, hi) * hw[0] * hw[1] / t.area)
            crop = t.crop
        scale = float(np.clip(scale, 0.3, 3.0))
        out = _warp(crop, rng, scale, angle, shear, flip, self.elastic)
        if t.thin:
            width = rng.uniform(*self._range("width", True, True, 1.0, 1.0)) * side
            skel = skeletonize(np.pad(out, 2))
            out = _thicken(skel, max(1.0, width))
            x0, y0, x1, y1 = _bbox(out)
            out = out[y0:y1, x0:x1]
        return out

    def _centre(self, t: Template, rng: np.random.Generator, fg: np.ndarray | None,
                hw: tuple[int, int], anywhere: bool) -> np.ndarray:
        if anywhere:
            where = fg if fg is not None else np.ones(hw, bool)
            return _random_pixel(rng, _outline(where) if t.touches and fg is not None else where)
        if fg is not None and t.pos_fg is not None:
            x0, y0, x1, y1, pos = *_bbox(fg), t.pos_fg
        else:
            x0, y0, x1, y1, pos = 0, 0, hw[1], hw[0], t.pos_image
        px, py = np.asarray(pos) + rng.normal(0, self.position_jitter, 2)
        return np.array([x0 + px * (x1 - x0) - 0.5, y0 + py * (y1 - y0) - 0.5])

    def sample(self, shape: Any, rng: Any = None, foreground: Any = None) -> np.ndarray:
        """A new mask ``H×W uint8 {0, 255}`` for an image of ``shape`` (``(H, W, ...)``): never
        empty, inside ``foreground`` (``H×W`` bool) when given; the same seed, the same mask."""
        rng, hw = _rng(rng), _hw(shape)
        fg = _foreground(foreground, hw)
        best = np.zeros(hw, bool)
        for _ in range(12):
            t = self.templates[int(rng.integers(len(self.templates)))]
            anywhere = bool(rng.random() < self.p_anywhere)
            crop = self._transform(t, rng, hw, anywhere)
            m = _paste(crop, self._centre(t, rng, fg, hw, anywhere), hw)
            if fg is not None:
                m = (_snap_to_outline(m, fg) if t.touches else m) & fg
            n = int(np.count_nonzero(m))
            if n >= 0.5 * np.count_nonzero(crop):
                return _as_mask(m)
            best = m if n > np.count_nonzero(best) else best
        return _as_mask(best if best.any() else _fallback(rng, hw, fg))


def fit_shape_model(masks: Sequence[Any], foregrounds: Any = None, **options: Any) -> ShapeModel:
    """Fit a :class:`ShapeModel` on the reference masks ``[H×W]`` (bool / uint8; sizes may differ)
    of one damage type. ``foregrounds``: None, one ``H×W`` bool for all, or one per mask (see
    :func:`estimate_foreground`). ``options`` set the model's perturbation fields."""
    bins = [to_binary(m) > 0 for m in masks]
    bins = [m for m in bins if m.any()]
    if not bins:
        raise ShapeError("No non-empty reference mask to fit a shape model on — use "
                         "sample_family(family_for(damage_type), ...) for a type without any")
    fgs = _per_mask(foregrounds, len(masks))
    fgs = [f for f, m in zip(fgs, masks) if (to_binary(m) > 0).any()]
    stats = shape_statistics(bins, fgs)
    templates = []
    for i, (m, f) in enumerate(zip(bins, fgs)):
        x0, y0, x1, y1 = _bbox(m)
        ys, xs = np.nonzero(m)
        pos_fg = None if _foreground(f, m.shape) is None else (stats["pos_x"][i], stats["pos_y"][i])
        templates.append(Template(m[y0:y1, x0:x1].copy(),
                                  ((xs.mean() + 0.5) / m.shape[1], (ys.mean() + 0.5) / m.shape[0]),
                                  pos_fg, min(m.shape), int(m.sum()), stats["skeleton_length"][i],
                                  bool(stats["edge_contact"][i] == 1),
                                  bool(stats["extent"][i] >= THIN_RATIO * stats["max_width"][i])))
    return ShapeModel(templates, stats, **options)


# --------------------------------------------------------------------------------------------
# Classic families (a type without reference masks)
# --------------------------------------------------------------------------------------------
def family_for(damage_type: str | None) -> str:
    """The family (:data:`FAMILIES`) for a damage type name by :data:`FAMILY_KEYWORDS`, e.g.
    ``crack`` → crack, ``scratch_head`` → scratch, ``hole`` / ``poke`` → hole, ``print`` → glyph,
    ``contamination`` / ``glue`` / ``color`` → stain, ``broken_large`` / ``cut_lead`` /
    ``damaged_case`` → bite, ``bent_lead`` / ``misplaced`` → edge; anything else → blob."""
    name = re.sub(r"[^a-z]+", " ", (damage_type or "").lower())
    for family, words in FAMILY_KEYWORDS:
        if any(w in name for w in words):
            return family
    return "blob"


def _draw(hw: tuple[int, int], pts: np.ndarray, thickness: int = 0) -> np.ndarray:
    """``H×W bool``: a polyline of ``pts [N x 2] (x, y)`` ``thickness`` px wide, or the filled
    polygon when ``thickness == 0``."""
    m = np.zeros(hw, np.uint8)
    p = [np.round(pts).astype(np.int32).reshape(-1, 1, 2)]
    if thickness:
        cv2.polylines(m, p, False, 255, int(thickness), lineType=cv2.LINE_8)
    else:
        cv2.fillPoly(m, p, 255, lineType=cv2.LINE_8)
    return m > 0


def _polar(rng: np.random.Generator, centre: np.ndarray, r0: float, amp: float, n: int = 48,
           aspect: tuple[float, float] = (0.75, 1.33)) -> np.ndarray:
    """Vertices ``[n x 2]`` of an irregular closed outline r(φ) = r0 (1 + Σ a_k cos(kφ + p_k)),
    stretched to an ellipse and rotated."""
    phi = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones(n)
    for k in range(2, 8):
        r += rng.uniform(0, amp) / np.sqrt(k - 1) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    r = max(r0, 1.5) * np.clip(r, 0.4, None)
    sx, rot = rng.uniform(*aspect), rng.uniform(0, np.pi)
    x, y = r * np.cos(phi) * sx, r * np.sin(phi) / sx
    return centre + np.stack([np.cos(rot) * x - np.sin(rot) * y,
                              np.sin(rot) * x + np.cos(rot) * y], axis=1)


def _midpoint_path(rng: np.random.Generator, a: np.ndarray, b: np.ndarray, depth: int,
                   rough: float) -> np.ndarray:
    """Midpoint displacement from ``a`` to ``b`` (``(x, y)``): ``2^depth + 1`` points, each new
    midpoint moved sideways by N(0, rough · segment length)."""
    pts = np.array([a, b], np.float64)
    for _ in range(depth):
        seg = pts[1:] - pts[:-1]
        normal = np.stack([-seg[:, 1], seg[:, 0]], 1)
        mids = (pts[1:] + pts[:-1]) / 2 + normal * rng.normal(0, rough, (len(seg), 1))
        out = np.empty((2 * len(pts) - 1, 2))
        out[0::2], out[1::2] = pts, mids
        pts = out
    return pts


def _unit(a: float) -> np.ndarray:
    return np.array([np.cos(a), np.sin(a)])


def _anchor(rng: np.random.Generator, fg: np.ndarray | None, hw: tuple[int, int],
            margin: float) -> np.ndarray:
    """A random ``(x, y)`` at least ``margin`` px inside the foreground when it can be."""
    where = fg if fg is not None else np.ones(hw, bool)
    inner = ndi.distance_transform_edt(np.pad(where, 1))[1:-1, 1:-1]     # image edge counts too
    inner = inner > margin
    return _random_pixel(rng, inner if inner.any() else where)


def _crack(rng, hw, fg, size):
    """A midpoint-displaced thin (1–2 px) jagged line with 1–3 thinner side branches."""
    length, theta = rng.uniform(0.2, 0.45) * size, rng.uniform(0, np.pi)
    c = _anchor(rng, fg, hw, 0.2 * length)
    main = _midpoint_path(rng, c - length / 2 * _unit(theta), c + length / 2 * _unit(theta), 5, 0.2)
    m = _draw(hw, main, int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(1, 4))):
        o = main[int(rng.integers(len(main) // 5, 4 * len(main) // 5))]
        a = theta + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1) + rng.choice([0, np.pi])
        m |= _draw(hw, _midpoint_path(rng, o, o + length * rng.uniform(0.15, 0.4) * _unit(a),
                                      4, 0.2), 1)
    return m


def _scratch(rng, hw, fg, size):
    """A thin (1–3 px) long quadratic Bézier line, slightly bent."""
    length, theta = rng.uniform(0.2, 0.6) * size, rng.uniform(0, np.pi)
    c = _anchor(rng, fg, hw, 0.1 * length)
    p0, p2 = c - length / 2 * _unit(theta), c + length / 2 * _unit(theta)
    p1 = c + rng.uniform(-0.15, 0.15) * length * _unit(theta + np.pi / 2)
    t = np.linspace(0, 1, 64)[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t ** 2 * p2
    return _draw(hw, curve, int(rng.integers(1, 4)))


def _hole(rng, hw, fg, size):
    """A nearly round disc: the hole (2–6 % of the object) and its rim (20–40 % more radius)."""
    r = rng.uniform(0.02, 0.06) * size * (1 + rng.uniform(0.2, 0.4))
    return _draw(hw, _polar(rng, _anchor(rng, fg, hw, r), r, 0.06, aspect=(0.9, 1.1)))


def _glyph(rng, hw, fg, size):
    """1–3 print-like characters in a row: 2–4 strokes each between points of a 3×3 grid."""
    g, n = rng.uniform(0.05, 0.12) * size, int(rng.integers(1, 4))
    start = _anchor(rng, fg, hw, g * n)
    grid = np.array([(x, y) for y in (0, 0.5, 1) for x in (0, 0.5, 1)]) * [0.6 * g, g]
    m = np.zeros(hw, bool)
    for i in range(n):
        for _ in range(int(rng.integers(2, 5))):
            a, b = rng.choice(9, 2, replace=False)
            m |= _draw(hw, start + [0.85 * g * i, -g / 2] + grid[[a, b]],
                       max(1, int(round(g / 7))))
    return m


def _stain(rng, hw, fg, size):
    """An irregular blob with 0–3 satellite droplets."""
    r = rng.uniform(0.03, 0.1) * size
    c = _anchor(rng, fg, hw, r)
    m = _draw(hw, _polar(rng, c, r, 0.3))
    for _ in range(int(rng.integers(0, 4))):
        p = c + r * rng.uniform(1.1, 1.8) * _unit(rng.uniform(0, 2 * np.pi))
        m |= _draw(hw, _polar(rng, p, r * rng.uniform(0.1, 0.3), 0.2))
    return m


def _bite(rng, hw, fg, size):
    """A jagged polygon centred on the object's outline (the image border without one)."""
    where = fg if fg is not None else np.ones(hw, bool)
    edge = _outline(where) if fg is not None else ~ndi.binary_erosion(where, border_value=0)
    r = rng.uniform(0.04, 0.12) * size
    return _draw(hw, _polar(rng, _random_pixel(rng, edge), r, 0.35, n=int(rng.integers(7, 13))))


def _edge_band(rng, hw, fg, size):
    """An elongated band (3–8 % of the object wide) along 10–30 % of the object's outline."""
    where = (fg if fg is not None else np.ones(hw, bool)).astype(np.uint8)
    contours, _ = cv2.findContours(np.pad(where, 1), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=len)[:, 0, :] - 1
    n = len(contour)
    i, k = int(rng.integers(n)), max(2, int(rng.uniform(0.1, 0.3) * n))
    seg = contour[(i + np.arange(k)) % n]
    return _draw(hw, seg, max(2, int(round(2 * rng.uniform(0.03, 0.08) * size))))


def _blob(rng, hw, fg, size):
    """An irregular ellipse-like blob (4–11 % of the object)."""
    r = rng.uniform(0.04, 0.11) * size
    return _draw(hw, _polar(rng, _anchor(rng, fg, hw, r), r, 0.25))


_FAMILY_FNS = {"crack": _crack, "scratch": _scratch, "hole": _hole, "glyph": _glyph,
               "stain": _stain, "bite": _bite, "edge": _edge_band, "blob": _blob}


def sample_family(family: str, shape: Any, rng: Any = None, foreground: Any = None) -> np.ndarray:
    """A mask ``H×W uint8 {0, 255}`` of a classic family (:data:`FAMILIES`), sized relative to the
    foreground's bounding box (the image without one): never empty, inside ``foreground`` when
    given, the same for the same seed."""
    if family not in _FAMILY_FNS:
        raise ShapeError(f"Unknown shape family {family!r}; known: {', '.join(FAMILIES)}")
    rng, hw = _rng(rng), _hw(shape)
    fg = _foreground(foreground, hw)
    x0, y0, x1, y1 = _bbox(fg) if fg is not None else (0, 0, hw[1], hw[0])
    size = float(min(x1 - x0, y1 - y0))
    enough = min(12, max(1, hw[0] * hw[1] // 4 if fg is None else int(fg.sum())))
    for _ in range(20):
        m = _FAMILY_FNS[family](rng, hw, fg, size)
        m = m & fg if fg is not None else m
        if np.count_nonzero(m) >= enough:
            return _as_mask(m)
    return _as_mask(_fallback(rng, hw, fg))


@dataclass
class FamilyModel:
    """The :class:`ShapeModel` stand-in for a type with no reference masks."""
    family: str
    stats: dict = field(default_factory=dict)

    def sample(self, shape: Any, rng: Any = None, foreground: Any = None) -> np.ndarray:
        return sample_family(self.family, shape, rng, foreground)


def shape_model_for(damage_type: str, masks: Sequence[Any] = (), foregrounds: Any = None,
                    **options: Any) -> ShapeModel | FamilyModel:
    """The fitted model when the type has reference masks, else its classic family's model; both
    have ``.sample(shape, rng, foreground=None)``."""
    if any((to_binary(m) > 0).any() for m in masks):
        return fit_shape_model(masks, foregrounds, **options)
    return FamilyModel(family_for(damage_type))
