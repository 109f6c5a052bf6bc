"""Fast CPU defect generators that need no weights — the offline default backend.

Every generator is a small class with ``name``, ``version`` and::

    gen(image: H×W×3 uint8, mask: H×W uint8, *, seed: int, feather: int = 4, **params)
        -> H×W×3 uint8

Contract (tested in ``tests/test_classical.py``):

- every pixel outside ``masks.dilate(mask, feather)`` is byte-identical to the input;
- the same seed gives the same output, different seeds give different outputs.

All work happens in a window around the mask (its bounding box plus the feather and a little
context), so the cost scales with the mask, not the image. The defect is composited as
``out = alpha·generated + (1 − alpha)·input`` with ``alpha = masks.feather(mask, feather)``, and
the input is copied back wherever ``alpha == 0``.

Inputs: ``image`` is ``H×W×3 uint8`` (an ``H×W`` grey image is stacked to RGB and an RGBA
image loses its alpha; the output is always RGB); ``mask`` is anything
:func:`pipelines.masks.validate_mask` accepts — an empty or wrongly sized mask raises
:class:`~pipelines.masks.MaskError` with a message for the user.

Generators: ``perlin`` (procedural DRAEM-style anomaly shaped by a defect style), ``cutpaste``
(a real defect of the same type, Poisson-blended) and ``wall-lab`` (LAB recolour to a target
colour with the shading kept).
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import cv2
import numpy as np
from skimage import color as skcolor

from dataclasses import dataclass

from pipelines import masks as mk
from pipelines.color import as_rgb, fit_to_srgb, lab_to_rgb, rgb_to_lab
from pipelines.generator import GeneratorInfo, option
from pipelines.generators.geometry import DIHEDRAL
from pipelines.generators.base import DEFAULT_FEATHER, WindowedGenerator, check_image, composite, window  # noqa: F401

# --------------------------------------------------------------------------------------------
# Damage type → defect style
# --------------------------------------------------------------------------------------------
_STYLE_KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("scratch", ("scratch",)),
    ("crack", ("crack",)),
    ("broken", ("broken", "chip", "hole", "cut", "missing")),
    ("blob", ("contamination", "stain", "glue", "oil", "liquid", "spot", "print")),
    ("color", ("color", "colour")),
)


def style_for(damage_type: str | None) -> str:
    """Map a damage type name (e.g. MVTec's ``scratch_head``, ``broken_large``) to a defect style
    of :data:`pipelines.masks.STYLES` by keyword; anything unrecognised is a ``blob``."""
    name = (damage_type or "").lower()
    for style, words in _STYLE_KEYWORDS:
        if any(w in name for w in words):
            return style
    return "blob"


# --------------------------------------------------------------------------------------------
# Perlin noise (vectorised numpy, deterministic from the rng)
# --------------------------------------------------------------------------------------------
def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise ``H×W float32`` in about [-1, 1]; ``res`` = (cells_y, cells_x)."""
    h, w = int(shape[0]), int(shape[1])
    ry, rx = max(1, int(res[0])), max(1, int(res[1]))
    angles = rng.uniform(0.0, 2.0 * np.pi, (ry + 1, rx + 1))
    gx, gy = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    ys = np.arange(h, dtype=np.float32) * (ry / h)
    xs = np.arange(w, dtype=np.float32) * (rx / w)
    iy, ix = ys.astype(np.int64), xs.astype(np.int64)
    fy, fx = (ys - iy)[:, None], (xs - ix)[None, :]

    def corner(oy: int, ox: int) -> np.ndarray:
        """Dot product of the (iy+oy, ix+ox) corner gradients with the offsets to it."""
        rows_x, rows_y = gx.take(iy + oy, axis=0), gy.take(iy + oy, axis=0)
        return rows_x.take(ix + ox, axis=1) * (fx - ox) + rows_y.take(ix + ox, axis=1) * (fy - oy)

    u, v = _fade(fx), _fade(fy)
    c00, c01, c10, c11 = corner(0, 0), corner(0, 1), corner(1, 0), corner(1, 1)
    n0 = c00 + u * (c01 - c00)
    n1 = c10 + u * (c11 - c10)
    return ((n0 + v * (n1 - n0)) * np.float32(np.sqrt(2.0))).astype(np.float32)


def fractal_noise(shape: tuple[int, int], rng: np.random.Generator, cell: float,
                  octaves: int = 4, persistence: float = 0.5) -> np.ndarray:
    """Sum of Perlin octaves (cell size ``cell`` px, halved per octave), normalised to ~[-1, 1]."""
    h, w = int(shape[0]), int(shape[1])
    out = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        c = max(1.0, cell / (2 ** o))
        out += amp * perlin_noise((h, w), (math.ceil(h / c), math.ceil(w / c)), rng)
        total += amp
        amp *= persistence
    return out / np.float32(total)


# --------------------------------------------------------------------------------------------
# Perlin anomaly
# --------------------------------------------------------------------------------------------
_STAIN_TINTS = (  # RGB 0..1, weights: brown / dark oil / rust / yellowish / whitish glue
    ((0.42, 0.29, 0.16), 0.3), ((0.17, 0.16, 0.14), 0.25), ((0.55, 0.31, 0.15), 0.2),
    ((0.62, 0.56, 0.32), 0.15), ((0.86, 0.85, 0.80), 0.1))


def _luma(x: np.ndarray) -> np.ndarray:
    return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114


@dataclass(frozen=True)
class PerlinOptions:
    style: str | None = option(None, "defect style (default: from the damage type's name)",
                               choices=mk.STYLES)


class PerlinDefectGenerator(WindowedGenerator):
    """Procedural anomaly inside the mask (DRAEM-style), shaped by a defect ``style``.

    Params: ``style`` (one of ``masks.STYLES``; default ``style_for(damage_type)``),
    ``damage_type``, ``strength`` (0..1, default 0.8). Needs no source data.
    """

    info = GeneratorInfo(
        "perlin", "1", "damage",
        "Procedural Perlin-noise defect inside the mask (DRAEM-style); needs no data",
        options=PerlinOptions, default_strength=0.8)

    def _generate(self, crop, cmask, rng, feather, *, strength, style=None, damage_type=None):
        style = style or style_for(damage_type)
        if style not in mk.STYLES:
            raise ValueError(f"unknown defect style {style!r}; known: {', '.join(mk.STYLES)}")
        x = crop.astype(np.float32) / 255.0
        inside = cmask > 0
        d_in = cv2.distanceTransform(np.where(inside, 255, 0).astype(np.uint8), cv2.DIST_L2, 3)
        size = max(8.0, float(np.sqrt(max(1, inside.sum()))))
        y = getattr(self, f"_{style}")(x, inside, d_in, size, rng)
        return 255.0 * (x + strength * (y - x))

    # Each style maps x (H×W×3 float 0..1) → the fully developed defect image.
    @staticmethod
    def _soft(inside: np.ndarray, sigma: float) -> np.ndarray:
        return cv2.GaussianBlur(inside.astype(np.float32), (0, 0), sigma)[..., None]

    def _scratch(self, x, inside, d_in, size, rng):
        fine = fractal_noise(x.shape[:2], rng, cell=rng.uniform(3, 8), octaves=3)
        along = fractal_noise(x.shape[:2], rng, cell=rng.uniform(20, 40), octaves=2)
        k = np.clip(0.7 + 0.35 * fine + 0.3 * along, 0.15, 1.0)[..., None]
        w = np.maximum(self._soft(inside, 0.7), inside[..., None]) * k
        if rng.random() < 0.6:    # bright scratch: bare metal / scattered light
            target = x + (1.0 - x) * rng.uniform(0.55, 0.85)
        else:                     # dark groove
            target = x * rng.uniform(0.25, 0.5)
        return x + w * (target - x)

    def _crack(self, x, inside, d_in, size, rng):
        n = fractal_noise(x.shape[:2], rng, cell=rng.uniform(4, 10), octaves=3)
        darkness = np.clip(0.12 + 0.12 * n, 0.02, 0.4)[..., None]
        w = np.maximum(self._soft(inside, 0.6), inside[..., None])
        w *= np.clip(0.85 + 0.3 * n, 0.4, 1.0)[..., None]
        return x + w * (x * darkness - x)

    def _blob(self, x, inside, d_in, size, rng):
        n = fractal_noise(x.shape[:2], rng, cell=max(4.0, size / rng.uniform(2.0, 4.0)), octaves=4)
        tints, weights = zip(*_STAIN_TINTS)
        tint = np.array(tints[int(rng.choice(len(tints), p=np.array(weights) / sum(weights)))],
                        np.float32)
        tint = np.clip(tint * rng.uniform(0.85, 1.15), 0.0, 1.0)
        lum = _luma(x)
        shade = lum / max(float(lum[inside].mean()), 1e-3)
        stain = np.clip(shade[..., None] * tint, 0.0, 1.0)
        opacity = np.clip(0.65 + 0.55 * n, 0.15, 1.0)
        rim = np.exp(-d_in / max(1.0, 0.06 * size)) * rng.uniform(0.0, 0.35)   # tide line
        o = np.clip(opacity + rim, 0.0, 1.0)[..., None] * np.maximum(self._soft(inside, 1.0),
                                                                    inside[..., None])
        return x + o * (stain - x)

    def _broken(self, x, inside, d_in, size, rng):
        h, w = x.shape[:2]
        n = fractal_noise((h, w), rng, cell=max(3.0, size / 5), octaves=3)
        fine = fractal_noise((h, w), rng, cell=2.5, octaves=2)
        depth = np.clip(d_in / max(2.0, 0.25 * float(d_in.max())), 0.0, 1.0)
        base = rng.uniform(0.03, 0.12)
        hole = base * (1.3 - 0.5 * depth + 0.35 * n)[..., None] + 0.12 * x * (1 - depth[..., None])
        rim_w = float(np.clip(0.12 * d_in.max(), 1.5, 6.0))
        rim = (d_in > 0) & (d_in <= rim_w * np.clip(0.55 + 0.6 * (n + 1) / 2 + 0.3 * fine, 0.3, 1.6))
        bright = np.clip(x + (1.0 - x) * (rng.uniform(0.3, 0.55) + 0.25 * fine[..., None]), 0, 1)
        y = np.where(rim[..., None], bright, hole)
        y = cv2.GaussianBlur(y.astype(np.float32), (0, 0), 0.6)
        return np.where(inside[..., None], y, x)

    def _color(self, x, inside, d_in, size, rng):
        h, w = x.shape[:2]
        n = fractal_noise((h, w), rng, cell=max(4.0, size / 3), octaves=3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lab = skcolor.rgb2lab(x.astype(np.float64))
        rot = np.radians(rng.uniform(60, 180) * rng.choice([-1, 1]))
        tint_angle = rng.uniform(0, 2 * np.pi)
        tint = rng.uniform(12, 30)
        ramp = np.clip(d_in / max(2.0, 0.35 * float(d_in.max())), 0.0, 1.0)
        amount = (np.clip(0.75 + 0.4 * n, 0.2, 1.0) * (0.35 + 0.65 * ramp))
        a, b = lab[..., 1], lab[..., 2]
        a2 = a * np.cos(rot) - b * np.sin(rot) + tint * np.cos(tint_angle)
        b2 = a * np.sin(rot) + b * np.cos(rot) + tint * np.sin(tint_angle)
        out = lab.copy()
        out[..., 1] = a + amount * (a2 - a)
        out[..., 2] = b + amount * (b2 - b)
        out[..., 0] = np.clip(lab[..., 0] + amount * rng.uniform(-6, 4), 0, 100)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = np.clip(skcolor.lab2rgb(out), 0, 1).astype(np.float32)
        return np.where(inside[..., None], y, x)


# --------------------------------------------------------------------------------------------
# Cut-paste with Poisson blending
# --------------------------------------------------------------------------------------------
_CLONE_MODES = {"normal": cv2.NORMAL_CLONE, "mixed": cv2.MIXED_CLONE}
_DISC5 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))


def donor_pair(pair: Any, i: int) -> tuple[np.ndarray, np.ndarray]:
    """A donor ``(image, mask)`` checked: ``H×W×3`` uint8 RGB and its validated ``H×W`` mask;
    errors name the donor."""
    try:
        img, msk = pair
    except (TypeError, ValueError):
        raise ValueError(f"donor {i} must be an (image, mask) pair") from None
    img = check_image(img)
    try:
        m = mk.validate_mask(msk, img.shape)
    except mk.MaskError as exc:
        raise mk.MaskError(f"Donor defect {i}: {exc}") from None
    return img, m


@dataclass(frozen=True)
class CutPasteOptions:
    clone: str = option("normal", "Poisson mode: normal (donor pixels, colours matched at the border) "
                                  "or mixed (the stronger gradient: more transparent defects)",
                        choices=tuple(_CLONE_MODES))


# Warps that lay a donor defect onto the painted mask (cut-paste here, defect-transfer imports them)
ELONGATED = 4.0            # a target this elongated (profiles.elongation: length / widest width) is
DONOR_ELONGATED = 1.2      # laid along its skeleton when the donor is at least this elongated (not round)
_TPS_POINTS = 32
RIGID_SLACK = 0.05         # the rigid (moments) alignment is kept unless a non-rigid warp overlaps
                           # the mask better by more than this IoU (it distorts the donor's content)


def _outline(mask: np.ndarray, n: int = _TPS_POINTS) -> np.ndarray | None:
    """``[n x 2]`` (x, y) points evenly spaced along the largest outer contour of a boolean mask,
    counter-clockwise (in image coordinates), starting at its rightmost point; None when the
    contour is too short to fit a warp to."""
    cs, _ = cv2.findContours(np.pad(mask, 1).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not cs:
        return None
    c = max(cs, key=cv2.contourArea)[:, 0, :].astype(np.float64) - 1.0
    if len(c) < 8 or cv2.contourArea(c.astype(np.float32)) < 6:
        return None
    x, y = c[:, 0], c[:, 1]
    if 0.5 * np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y) < 0:      # orientation
        c = c[::-1]
    c = np.roll(c, -int(np.argmax(c[:, 0])), axis=0)
    closed = np.vstack([c, c[:1]])
    seg = np.sqrt((np.diff(closed, axis=0) ** 2).sum(1))
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    s = np.linspace(0.0, arc[-1], n, endpoint=False)
    return np.stack([np.interp(s, arc, closed[:, 0]), np.interp(s, arc, closed[:, 1])], 1)


def _pole(mask: np.ndarray) -> np.ndarray:
    """The mask pixel farthest from its outline (x, y): its interior anchor."""
    d = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(d)), d.shape)
    return np.array([x, y], np.float64)


def tps_map(src: np.ndarray, dst: np.ndarray, shape: tuple[int, int], reg: float = 1e-3
            ) -> tuple[np.ndarray, np.ndarray]:
    """Thin-plate spline through ``src [N x 2] → dst [N x 2]`` (x, y) evaluated on every pixel of
    a ``shape`` window → ``(mx, my)`` float32 maps (``cv2.remap``). Coordinates are normalised by
    the source spread; ``reg`` is the smoothing (in those units); a large window is evaluated on
    a coarser grid and interpolated (the spline is smooth)."""
    h, w = shape
    c = src.mean(0)
    sc = max(float(np.sqrt(((src - c) ** 2).sum(1).mean())), 1.0)
    a = (src - c) / sc
    n = len(a)

    def U(r2):
        return np.where(r2 > 0, r2 * np.log(np.maximum(r2, 1e-12)), 0.0)

    K = U(((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)) + reg * np.eye(n)
    Pm = np.hstack([np.ones((n, 1)), a])
    L = np.zeros((n + 3, n + 3))
    L[:n, :n], L[:n, n:], L[n:, :n] = K, Pm, Pm.T
    rhs = np.zeros((n + 3, 2))
    rhs[:n] = dst
    coef = np.linalg.lstsq(L, rhs, rcond=None)[0]
    step = max(1, int(math.ceil(max(h, w) / 128)))
    gy, gx = np.mgrid[0:h + step:step, 0:w + step:step].astype(np.float64)
    q = (np.stack([gx.ravel(), gy.ravel()], 1) - c) / sc
    val = U(((q[:, None, :] - a[None, :, :]) ** 2).sum(-1)) @ coef[:n] + \
        np.hstack([np.ones((len(q), 1)), q]) @ coef[n:]
    mx, my = val[:, 0].reshape(gx.shape), val[:, 1].reshape(gx.shape)
    if step > 1:
        # the coarse grid's node k sits at pixel k·step: crop after an exact-factor resize
        size = (gx.shape[1] * step, gx.shape[0] * step)
        mx = cv2.resize(mx.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
        my = cv2.resize(my.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
        off = (step - 1) / 2.0                  # resize centres: pixel i ↔ node (i − off) / step
        M = np.float32([[1, 0, -off], [0, 1, -off]])
        mx = cv2.warpAffine(mx, M, size, borderMode=cv2.BORDER_REPLICATE)
        my = cv2.warpAffine(my, M, size, borderMode=cv2.BORDER_REPLICATE)
    return mx[:h, :w].astype(np.float32), my[:h, :w].astype(np.float32)


def outline_correspondence(target: np.ndarray, donor: np.ndarray, rng: np.random.Generator,
                           zoom: float = 1.0) -> tuple[np.ndarray, np.ndarray] | None:
    """Matched points ``(target [N x 2], donor [N x 2])``: the two outlines (:func:`_outline`)
    plus their interior poles, the donor's cyclic start and direction (a reflection) the one that
    best matches the target's normalised outline — near-ties (cost ≤ 1.15 × the best) drawn by
    ``rng`` — and the donor's points pulled towards its pole by ``1 / zoom`` (``zoom`` > 1: the
    donor defect lands a little inside the painted outline). None when either outline is
    degenerate."""
    ot, od = _outline(target), _outline(donor)
    if ot is None or od is None:
        return None
    pt, pd = _pole(target), _pole(donor)
    nt = (ot - ot.mean(0)) / max(float(np.sqrt(((ot - ot.mean(0)) ** 2).sum(1).mean())), 1e-6)
    cands = []
    for mirror in (False, True):
        seq = od[::-1] if mirror else od
        nd = (seq - seq.mean(0)) / max(float(np.sqrt(((seq - seq.mean(0)) ** 2).sum(1).mean())), 1e-6)
        for k in range(len(seq)):
            cands.append((float(((nt - np.roll(nd, -k, axis=0)) ** 2).sum()), mirror, k))
    costs = np.array([c[0] for c in cands])
    good = np.flatnonzero(costs <= 1.15 * costs.min() + 1e-9)
    _, mirror, k = cands[int(good[int(rng.integers(len(good)))])]
    seq = np.roll(od[::-1] if mirror else od, -k, axis=0)
    seq = pd + (seq - pd) / max(zoom, 1e-6)
    return np.vstack([ot, pt[None]]), np.vstack([seq, pd[None]])


def _dihedral_affine(tmask: np.ndarray, dmask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The fallback for masks without a usable outline or skeleton (a pixel, the whole window):
    the target mask's bbox onto the donor defect's bbox (zoomed out a little), in the one of the 8
    flips / 90° rotations whose warped donor mask overlaps the target best (near-ties seeded)."""
    tx0, ty0, tx1, ty1 = mk.bbox(tmask)  # type: ignore[misc]
    dx0, dy0, dx1, dy1 = mk.bbox(dmask)  # type: ignore[misc]
    tw, th = tx1 - tx0, ty1 - ty0
    dw, dh = (dx1 - dx0) * rng.uniform(1.0, 1.15), (dy1 - dy0) * rng.uniform(1.0, 1.15)
    ct = np.array([(tx0 + tx1 - 1) / 2.0, (ty0 + ty1 - 1) / 2.0])
    cd = np.array([(dx0 + dx1 - 1) / 2.0, (dy0 + dy1 - 1) / 2.0])
    affines = []
    for d8 in DIHEDRAL:
        lin = np.diag([dw, dh]) @ d8 @ np.diag([1.0 / tw, 1.0 / th])
        affines.append(np.hstack([lin, (cd - lin @ ct)[:, None]]))
    target_box = cv2.dilate(tmask[ty0:ty1, tx0:tx1].astype(np.uint8), _DISC5) > 0
    scores = []
    for aff in affines:
        box_aff = aff.copy()
        box_aff[:, 2] += aff[:, :2] @ np.array([tx0, ty0], float)
        warped = cv2.warpAffine(dmask.astype(np.uint8), box_aff, (tw, th),
                                flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP)
        warped = cv2.dilate(warped, _DISC5) > 0
        scores.append((warped & target_box).sum() / max(1, (warped | target_box).sum()))
    scores = np.array(scores)
    good = np.flatnonzero(scores >= scores.max() - 0.05)
    return affines[int(good[int(rng.integers(len(good)))])]


def _outside_along_normals(mx: np.ndarray, my: np.ndarray, target: np.ndarray,
                           donor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Outside the target mask, replace a spline's extrapolation (which folds into the donor
    defect at concave outlines) by the outline's own continuation: a pixel ``d`` px outside the
    target maps to where its nearest target pixel maps, moved ``d × scale`` px outward along the
    donor's distance gradient — so the clone region's border always samples the donor's
    surroundings, never its defect."""
    from scipy import ndimage as ndi
    d_t, (iy, ix) = ndi.distance_transform_edt(~target, return_indices=True)
    bx, by = mx[iy, ix], my[iy, ix]
    d8 = donor.astype(np.uint8)
    sdf = (cv2.distanceTransform(1 - d8, cv2.DIST_L2, 5) - cv2.distanceTransform(d8, cv2.DIST_L2, 5))
    sdf = cv2.GaussianBlur(sdf.astype(np.float32), (0, 0), 1.5)
    gx = cv2.Sobel(sdf, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(sdf, cv2.CV_32F, 0, 1, ksize=3)
    ux = cv2.remap(gx, bx, by, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    uy = cv2.remap(gy, bx, by, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    norm = np.maximum(np.sqrt(ux * ux + uy * uy), 1e-6)
    scale = math.sqrt(max(donor.sum(), 1) / max(target.sum(), 1))
    step = (d_t * scale).astype(np.float32)
    out = ~target
    return (np.where(out, bx + ux / norm * step, mx).astype(np.float32),
            np.where(out, by + uy / norm * step, my).astype(np.float32))


def _folds(mx: np.ndarray, my: np.ndarray, where: np.ndarray) -> float:
    """Share of the pixels ``where`` at which a map folds over (its Jacobian determinant ≤ 0)."""
    dxx, dxy = np.gradient(mx, axis=1), np.gradient(mx, axis=0)
    dyx, dyy = np.gradient(my, axis=1), np.gradient(my, axis=0)
    det = dxx * dyy - dxy * dyx
    return float((det[where] <= 0).mean()) if where.any() else 0.0


def _overlap(mx: np.ndarray, my: np.ndarray, target: np.ndarray, donor: np.ndarray) -> float:
    """IoU of the donor mask pulled back through the map with the target mask."""
    pulled = cv2.remap(donor.astype(np.uint8), mx, my, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT) > 0
    return float((pulled & target).sum() / max(1, (pulled | target).sum()))


def _field_map(target: np.ndarray, donor: np.ndarray, rng: np.random.Generator
               ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Moments alignment over the dihedral group (defect-transfer's, jittered by ±6° and
    ×e^(±0.06): a donor's content — a part, a lead, printed text — is not turned at random), then
    the smooth displacement field that pulls the warped donor mask's distance function onto the
    target's. Returns both maps: ``(affine only, affine + field)``."""
    from pipelines.generators import geometry as T
    h, w = target.shape
    _, _, sig = T.moments(target)
    angle = math.radians(6.0) * rng.uniform(-1, 1)
    scale = math.exp(0.06 * rng.uniform(-1, 1))
    affine, _ = T.best_affine(target, donor, T.candidate_affines(target, donor, angle, scale), rng)
    warped = cv2.warpAffine(donor.astype(np.float32), affine, (w, h),
                            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP) > 0.5
    u = T.displacement_field(target, warped, 4.0 * float(sig[0]))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    def through(px, py):
        return ((affine[0, 0] * px + affine[0, 1] * py + affine[0, 2]).astype(np.float32),
                (affine[1, 0] * px + affine[1, 1] * py + affine[1, 2]).astype(np.float32))
    return through(xx, yy), through(xx + u[..., 0], yy + u[..., 1])


def follow_mask_map(target: np.ndarray, donor_mask: np.ndarray, rng: np.random.Generator,
                    zoom: float = 1.0) -> tuple[np.ndarray, np.ndarray, str] | None:
    """Donor-window coordinates ``(mx, my, how)`` for every pixel of the target window so that
    the donor defect follows the painted mask ``target`` (bool):

    - ``"skeleton"`` — an elongated target (length / widest width ≥ :data:`ELONGATED`) and a
      donor that is not round (≥ :data:`DONOR_ELONGATED`): laid along the two skeletons
      (:func:`pipelines.generators.profiles.strip_map`; the seed reverses, mirrors and shifts
      it);
    - otherwise ``"affine"``, the moments alignment, when no non-rigid warp overlaps the mask
      better by more than :data:`RIGID_SLACK` IoU (the shape model's masks are the references'
      own shapes, perturbed: the donor content is kept undistorted); else the better of two warps
      of the outline onto the outline — the one whose pulled-back donor mask overlaps the target
      most among those that do not fold over (Jacobian determinant ≤ 0 on ≤ 0.5 % of the region
      around the mask): ``"outline"``, a thin-plate
      spline from the target's outline (and its interior pole) onto the donor's
      (:func:`outline_correspondence`, :func:`tps_map`; continued outside the target along the
      donor's outline normals, :func:`_outside_along_normals`), exact on smooth shapes but prone
      to fold on jagged, many-lobed ones; ``"field"``, the moments alignment plus a smooth
      displacement field (:func:`_field_map`), never folding but looser.

    None when no warp applies (the caller falls back to an affine map). ``rng`` draws, in this
    order: reverse, mirror, shift (skeleton), or the outline match's tie-break, then the field's
    rotation, scale and dihedral tie-break."""
    from pipelines.generators import profiles as P
    h, w = target.shape
    ts = P.strip_of(target) if P.elongation(target) >= ELONGATED else None
    ds = P.cached("strip", P.mask_key(donor_mask), lambda: P.strip_of(donor_mask)
                  if P.elongation(donor_mask) >= DONOR_ELONGATED else None) if ts is not None else None
    if ts is not None and ds is not None:
        reverse, mirror, shift = bool(rng.random() < 0.5), bool(rng.random() < 0.5), float(rng.random())
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        mx, my = P.strip_map(ts, ds, xx, yy, (h, w), reverse=reverse, mirror=mirror, shift=shift)
        return mx, my, "skeleton"
    if target.sum() < 4 or donor_mask.sum() < 4 or target.all():
        return None
    region = mk.dilate(np.where(target, 255, 0).astype(np.uint8), 3) > 0
    options = []
    corr = outline_correspondence(target, donor_mask, rng, zoom)
    if corr is not None:
        mx, my = tps_map(corr[0], corr[1], (h, w))
        mx, my = _outside_along_normals(mx, my, target, donor_mask)
        if _folds(mx, my, region) <= 0.005:
            options.append((_overlap(mx, my, target, donor_mask), mx, my, "outline"))
    (ax, ay), (fx, fy) = _field_map(target, donor_mask, rng)
    options.append((_overlap(fx, fy, target, donor_mask) + 1e-6, fx, fy, "field"))
    rigid = _overlap(ax, ay, target, donor_mask)
    best = max(options, key=lambda o: o[0])
    if rigid >= best[0] - RIGID_SLACK:            # the least distortion that follows the mask
        return ax, ay, "affine"
    return best[1], best[2], best[3]


class CutPasteGenerator(WindowedGenerator):
    """A real defect of the same type, warped onto the painted mask and Poisson-blended.

    Params: ``donors`` — list of ``(image, mask)`` pairs (real defect images with their masks);
    ``clone`` — ``"normal"`` (default: the donor's pixels replace the mask, colours matched at the
    border) or ``"mixed"`` (per pixel the stronger gradient of donor and target: the target's
    texture shows through flat donor areas, defects look more transparent); ``strength``
    (default 1).

    The donor follows the mask (:func:`follow_mask_map`): along an elongated painted stroke it is
    laid along the stroke's skeleton (its own skeleton's arc length onto the stroke's, its width
    onto the stroke's local width), so a crack runs the whole stroke and is as thin as it; on
    other masks the donor is aligned by its moments (rotation, scale, the best of the 8 flips /
    90° turns) and, where that leaves the painted outline uncovered, warped outline onto outline by
    a thin-plate spline (zoomed ×1..1.15 so its edge lands just inside) or by a smooth displacement
    field, whichever overlaps better without folding. A mask with neither (a pixel,
    the whole window) falls back to the bbox-onto-bbox flip / rotation whose overlap is best. The seed picks
    the donor, the zoom and the warp's orientation (reversed / mirrored, the outline match among
    near-ties). Blending: ``cv2.seamlessClone`` over ``dilate(mask, feather + 4)``; the feathered
    composite then restricts the change to ``dilate(mask, feather)``.
    """

    info = GeneratorInfo(
        "cutpaste", "2", "damage", "Cut-paste of a real reference defect of this type, warped onto the "
        "painted mask (along its skeleton, or outline onto outline) with Poisson blending",
        options=CutPasteOptions, needs_donors=True)
    _clone_extra = 4           # seamlessClone only changes the mask eroded by 1 px and ignores
    _pad = 8                   # masks narrower than ~7 px, so the clone mask is dilated
    _context = _clone_extra + 2

    def check_params(self, params: dict) -> None:
        donors = params.get("donors")
        if not donors:
            kind = params.get("damage_type")
            raise ValueError(
                "cut-paste needs at least one real defect of this type in the dataset "
                f"{'(' + repr(kind) + ') ' if kind else ''}— import or accept a real defect image "
                "with its mask, or pick the perlin generator")

    @staticmethod
    def _donor(pair: Any, i: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
        img, m = donor_pair(pair, i)
        return img, m, mk.bbox(m)  # type: ignore[return-value]

    def _generate(self, crop, cmask, rng, feather, *, strength, donors, clone="normal",
                  damage_type=None):
        if clone not in _CLONE_MODES:
            raise ValueError(f"unknown clone mode {clone!r}; known: {', '.join(_CLONE_MODES)}")
        i = int(rng.integers(len(donors)))
        donor, dmask, _ = self._donor(donors[i], i)
        zoom = float(rng.uniform(1.0, 1.15))

        # 1. Pad the window (reflect) so the clone mask never touches the canvas border.
        p = self._pad
        dst = cv2.copyMakeBorder(crop, p, p, p, p, cv2.BORDER_REFLECT_101)
        tmask = cv2.copyMakeBorder(cmask.astype(np.uint8), p, p, p, p, cv2.BORDER_CONSTANT, value=0)
        tmask[p:-p, p:-p] = cmask
        clone_mask = mk.dilate(np.where(tmask > 0, 255, 0).astype(np.uint8), feather + self._clone_extra)
        clone_mask[:2], clone_mask[-2:], clone_mask[:, :2], clone_mask[:, -2:] = 0, 0, 0, 0

        # 2. The donor warped onto the painted mask (in a window around the donor defect).
        dys, dxs = window(dmask, 24 + int(math.ceil(feather)) + self._clone_extra)
        dwin = dmask[dys, dxs] > 0
        mapped = follow_mask_map(tmask > 0, dwin, rng, zoom)
        if mapped is not None:
            mx, my, _ = mapped
            src = cv2.remap(donor, mx + np.float32(dxs.start), my + np.float32(dys.start),
                            cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        else:
            affine = _dihedral_affine(tmask > 0, dmask > 0, rng)
            src = cv2.warpAffine(donor, affine, (dst.shape[1], dst.shape[0]),
                                 flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                 borderMode=cv2.BORDER_REFLECT_101)

        # 3. Poisson blend. seamlessClone places the mask's bounding rect centred at `centre`
        #    (top-left = centre - size // 2), so this centre maps the rect onto itself.
        bx, by, bw, bh = cv2.boundingRect(clone_mask)
        centre = (bx + bw // 2, by + bh // 2)
        # (OpenCV 5.0 erodes the mask it is given in place: never pass the same mask twice)
        blended = cv2.seamlessClone(src, dst, clone_mask.copy(), centre, _CLONE_MODES[clone])
        blended = blended[p:-p, p:-p].astype(np.float32)
        return crop + strength * (blended - crop)


# --------------------------------------------------------------------------------------------
# Wall colour: LAB recolour
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WallLabOptions:
    keep_chroma: float = option(0.15, "share of the wall's own a/b texture kept (0 = flat colour)",
                                min=0.0, max=1.0, step=0.05)
    mottle: float = option(0.8, "seeded low-amplitude colour variation (a/b units; 0 = none)",
                           min=0.0, max=5.0, step=0.1)


class LabRecolorGenerator(WindowedGenerator):
    """Recolour the masked region to ``color`` in CIE LAB, keeping its shading.

    ``L_out = L_target + g·(L_in − mean(L_in over mask))`` with one gain ``g ≤ 1`` that
    compresses the lightness range around the target (instead of clipping hard) when the target
    is very dark or light, so L_out stays a linear function of L_in (the shading is kept, Pearson
    r ≈ 1). a/b: the target's plus ``keep_chroma`` × the region's own a/b deviations plus
    ``mottle``. Out-of-gamut colours are mapped into sRGB by shrinking their chroma (L kept), and
    a few correction passes shift L/a/b so that the mean LAB colour of the region — measured
    after 8-bit rounding — matches the target (ΔE2000 < 2, usually < 0.5); if it cannot (very
    saturated targets such as #ffff00), the shading is flattened step by step.

    ``mottle`` (a/b units, default 0.8) is a seeded low-amplitude Perlin variation — paint is
    never perfectly flat — so different seeds give different candidates; ``mottle=0`` makes the
    output seed-independent.

    Params: ``color`` ('#RRGGBB' or (r, g, b), required), ``keep_chroma`` (0..1, default 0.15),
    ``mottle`` (default 0.8), ``strength`` (default 1).
    """

    info = GeneratorInfo("wall-lab", "1", "color",
                         "LAB recolour to a target colour, shading kept (wall colour mode)",
                         options=WallLabOptions)
    _request_params = ("damage_type", "strength", "color")
    _L_LO, _L_HI = 0.5, 99.5
    _SAMPLE = 8_000            # masked pixels used by the correction passes

    def check_params(self, params: dict) -> None:
        if params.get("color") is None:
            raise ValueError("wall-lab needs a target colour: pass color='#RRGGBB'")
        as_rgb(params["color"])   # fail fast on a bad colour

    def _generate(self, crop, cmask, rng, feather, *, strength, color, keep_chroma=0.15,
                  mottle=0.8, damage_type=None):
        target = rgb_to_lab(np.array(as_rgb(color), np.uint8))
        lab = rgb_to_lab(crop)
        inside = cmask > 0
        dev = lab - lab[inside].mean(axis=0)          # shading (L) and texture (a, b)
        keep = float(np.clip(keep_chroma, 0.0, 1.0))
        h, w = crop.shape[:2]
        cell = max(8.0, min(h, w) / 3.0)
        noise_ab = np.stack([fractal_noise((h, w), rng, cell, octaves=3) for _ in range(2)], -1)
        noise_ab *= float(mottle)

        # Lightness gain: target ± shading fits in [_L_LO, _L_HI] (1 % tails may clip).
        lo, hi = np.percentile(dev[inside, 0], [1.0, 99.0])
        gain = 1.0
        if hi > 0:
            gain = min(gain, max(0.0, self._L_HI - target[0]) / hi)
        if lo < 0:
            gain = min(gain, max(0.0, target[0] - self._L_LO) / -lo)

        def build(d: np.ndarray, noise: np.ndarray, offset: np.ndarray, shade: float) -> np.ndarray:
            out = np.empty(d.shape, np.float64)
            out[..., 0] = np.clip(target[0] + offset[0] + shade * gain * d[..., 0], 0.0, 100.0)
            out[..., 1:] = target[1:] + offset[1:] + shade * (keep * d[..., 1:] + noise)
            return fit_to_srgb(out)

        def mean_lab(d, noise, offset, shade):
            return rgb_to_lab(lab_to_rgb(build(d, noise, offset, shade))).mean(axis=0)

        # Correction passes on (a fixed sample of) the masked pixels: measure the mean LAB after
        # gamut mapping and 8-bit rounding, shift the offsets by the error. If that stalls
        # (gamut-cusp targets like #ffff00, where only one lightness reaches the chroma), flatten
        # all deviations step by step: at shade 0 every pixel is the target colour itself.
        idx = np.flatnonzero(inside.ravel())
        if idx.size > self._SAMPLE:
            idx = np.sort(np.random.default_rng(0).choice(idx, self._SAMPLE, replace=False))
        d_s, n_s = dev.reshape(-1, 3)[idx], noise_ab.reshape(-1, 2)[idx]
        offset, shade = np.zeros(3), 1.0
        best = (np.inf, offset, shade)
        for it in range(32):
            mean = mean_lab(d_s, n_s, offset, shade)
            de = float(skcolor.deltaE_ciede2000(mean, target))
            if de < best[0]:
                best = (de, offset.copy(), shade)
            if de < 0.25:
                break
            offset = offset + (target - mean)
            if it % 4 == 3 and best[0] > 1.0:
                offset, shade = np.zeros(3), shade * 0.7
        _, offset, shade = best
        recoloured = lab_to_rgb(build(dev, noise_ab, offset, shade))
        # Final check on every masked pixel (the sample's mean is an estimate): one more pass.
        mean = rgb_to_lab(recoloured[inside]).mean(axis=0)
        if idx.size < inside.sum() and skcolor.deltaE_ciede2000(mean, target) > 0.5:
            recoloured = lab_to_rgb(build(dev, noise_ab, offset + (target - mean), shade))
        return crop + strength * (recoloured.astype(np.float32) - crop)
