"""``warp``: geometric deformation of the structure under the mask — bent leads, misplaced or
tilted parts, dents, deformed threads.

The structure under the mask moves along a smooth displacement field; the background the move
reveals is filled as :mod:`pipelines.generators.remove` fills it (background copied from the
target and the registered good images at the background's period, ``cv2.inpaint`` for the rest).

Motions (``motion``; the backward map ``x → src(x)`` says which input pixel each output pixel
shows)
----------------------------------------------------------------------------------------------
- ``bend`` — the part beyond a pivot turns by ``θ`` about it: ``src = p + R(−θ)(x − p)``. The
  pivot is where the structure enters the mask (the centroid of the largest entry, see
  :func:`pipelines.generators.remove.entries`), so the part stays attached: a lead bent where
  it leaves the body.
- ``shift`` / ``rotate`` — the part moves rigidly: rotation by ``θ`` about its centroid and a
  translation ``t`` (``rotate`` without translation): a misplaced, shifted or tilted component.
- ``kink`` — a bow across the structure: ``src = x − o·n·φ(x)``, ``n`` across the part's main
  axis, ``φ`` 0 where the structure enters the mask and 1 midway (``sin(π·t)`` along the part
  when it crosses the mask, else a bump inside it): a dent, a deformed thread.
- ``elastic`` — a mask without structure (a texture): a smooth seeded field, 0 at the mask's
  outline.
- ``auto`` — by the damage type's name (``bent``/``bend``/``tilt`` → bend; ``misplac``/``shift``/
  ``position``/``rotat``/``flip`` → shift; ``dent``/``deform``/``thread``/``squeez``/``crush`` →
  kink), else by how many times the structure leaves the mask: 0 → shift, 1 → bend, ≥ 2 → kink.

Magnitude and direction
-----------------------
**Fitted to the reference defects** (``donors``, when ``learn``; :func:`fit_donor`, cached per
donor): each reference defect is registered to its nearest good image (ECC, the defect region
left out); the good's structure inside the (dilated) defect mask is the part *before* the
defect, the reference's structure there the part *after* it. Over a grid of each motion's
parameters (bend: ``θ`` −80°..80° about the good's pivot; rigid: ``θ`` −90°..90°, then the
translation that matches centroids) the one whose moved good structure overlaps the
reference's best (IoU) is the measured motion; dense optical flow (DIS) between the two inside
the defect mask gives the displacement's size for kink / elastic. A measurement counts when
it improves the overlap of "nothing moved" by ≥ 0.08 IoU and reaches ≥ 0.3; otherwise (a
missing part, a pose the overlap cannot explain) the donor is not used. Each candidate draws one
measured donor: ``|θ|`` and the translation (relative to the part's length) scaled by the seeded
factor ``e^(±1.2·jitter)`` (log-uniform) and by ``strength / 0.8`` (the default strength
reproduces the references).
**Else by severity** (``strength``): bend ``θ`` = 40°·strength, rotate 15°·strength, shift
0.15·strength of the part's length, kink 1 + 0.8·strength × the structure's width, elastic
8 % of the mask's size (at least 2.5 px) — each × the same seeded factor.

Each connected blob of the mask moves its own structure (two bent tips painted as two blobs bend
about their own pivots). The direction (bend's sign; shift's direction among 8, rotation's sign)
is the one whose moved structure stays inside its blob best (the mask is the defect's label: real bent-lead masks cover
the lead's new place), seeded among near-ties.

Rendering: the moved part (its anti-aliased alpha, remapped) over the filled background; the
base class composites (outside ``dilate(mask, feather)`` the input's bytes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from pipelines import masks as mk
from pipelines.classical import donor_pair
from pipelines.generator import GeneratorInfo, option
from pipelines.generators import align as A
from pipelines.generators import remove as RM
from pipelines.generators.base import WindowedGenerator

MOTIONS = ("auto", "bend", "kink", "shift", "rotate", "elastic")
_KEYWORDS = (("bend", ("bent", "bend", "tilt")),
             ("shift", ("misplac", "shift", "position", "rotat", "flip", "offset")),
             ("kink", ("dent", "deform", "thread", "squeez", "crush", "kink")))
_MIN_GAIN = 0.08               # IoU a fitted motion must add over "nothing moved"
_MIN_IOU = 0.3                 # … and reach: a poorer overlap explains nothing


@dataclass(frozen=True)
class WarpOptions:
    motion: str = option("auto", "the deformation: bend (about where the structure enters the mask), "
                                 "shift / rotate (the part moves rigidly), kink (a bow across it), "
                                 "elastic (a smooth field: textures) or auto (from the damage type's "
                                 "name, else how the structure crosses the mask)", choices=MOTIONS)
    learn: bool = option(True, "fit the displacement's size and direction to the type's reference "
                               "defects when there are some (off: from strength)")
    fill: str = option("auto", "where the revealed background comes from: auto (the target's own "
                               "background and the registered good images; cv2.inpaint for the "
                               "rest) or inpaint (cv2.inpaint only)", choices=RM.FILLS)
    jitter: float = option(0.5, "seeded variation of the displacement's size (× e^(±1.2·jitter), "
                                "log-uniform) and direction among near-equal fits (0 = none)",
                           min=0.0, max=1.0, step=0.05)


# --------------------------------------------------------------------------------------------
# Motions: backward maps
# --------------------------------------------------------------------------------------------
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return xx, yy


def rotation_map(xx, yy, centre, theta_deg: float, shift=(0.0, 0.0)):
    """Backward map of ``x' = c + R(θ)(x − c) + t``: ``src = c + R(−θ)(x − c − t)``."""
    a = math.radians(theta_deg)
    ca, sa = math.cos(a), math.sin(a)
    dx = xx - np.float32(centre[0] + shift[0])
    dy = yy - np.float32(centre[1] + shift[1])
    # R(−θ) with image axes (x right, y down): positive θ turns clockwise on screen
    mx = np.float32(centre[0]) + np.float32(ca) * dx + np.float32(sa) * dy
    my = np.float32(centre[1]) - np.float32(sa) * dx + np.float32(ca) * dy
    return mx.astype(np.float32), my.astype(np.float32)


def moved(alpha: np.ndarray, mx: np.ndarray, my: np.ndarray) -> np.ndarray:
    return cv2.remap(alpha, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def pivot_of(structure: np.ndarray, part: np.ndarray, mask: np.ndarray,
             rng: np.random.Generator | None = None) -> np.ndarray:
    """``(x, y)``: the centroid of the largest place where the structure enters the mask; without
    one, the end of the part (along its main axis) nearer the structure outside the mask."""
    lab, n = RM.entries(structure, part, mask)
    if n:
        sizes = np.bincount(lab.ravel())[1:]
        ys, xs = np.nonzero(lab == 1 + int(np.argmax(sizes)))
        return np.array([xs.mean(), ys.mean()])
    c, axes, sig = A.moments(part)
    ends = [c + axes[:, 0] * 2 * sig[0], c - axes[:, 0] * 2 * sig[0]]
    out = structure & ~mask
    if out.any():
        oy, ox = np.nonzero(out)
        d = [np.min(np.hypot(ox - e[0], oy - e[1])) for e in ends]
        return ends[int(np.argmin(d))]
    return ends[int(rng.integers(2))] if rng is not None else ends[0]


# --------------------------------------------------------------------------------------------
# Fitting the motion to a reference defect
# --------------------------------------------------------------------------------------------
@dataclass
class Fit:
    """What a reference defect says about the motion (angles in degrees, lengths / the part's
    length ``extent`` px)."""
    measured: bool
    bend: float = 0.0           # bend angle about the pivot
    bend_iou: float = 0.0
    rotate: float = 0.0         # rigid rotation
    shift: float = 0.0          # rigid translation / extent
    rigid_iou: float = 0.0
    flow: float = 0.0           # 90th percentile of the optical flow's length / extent
    base_iou: float = 0.0
    extent: float = 1.0


_FITS = A.LRU(256)


def _flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dense optical flow ``a → b`` (DIS, medium preset; Farnebäck when DIS is missing)."""
    ga = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)
    gb = cv2.cvtColor(b, cv2.COLOR_RGB2GRAY)
    try:
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        return dis.calc(ga, gb, None)
    except (AttributeError, cv2.error):
        return cv2.calcOpticalFlowFarneback(ga, gb, None, 0.5, 4, 15, 3, 5, 1.1, 0)


def fit_donor(image: np.ndarray, mask: np.ndarray, goods) -> Fit:
    """The motion that turns the nearest registered good's structure into the reference's inside
    the defect mask (see the module docstring); cached per donor and goods."""
    key = (A.pixel_key(image), A.pixel_key(mask.astype(np.uint8)),
           tuple(A.pixel_key(g[::5, ::5]) for g in goods) if goods else ())
    return _FITS.get_or(key, lambda: _fit_donor(image, mask, goods))


def _fit_donor(image: np.ndarray, mask: np.ndarray, goods) -> Fit:
    m = mask > 0
    if not goods or not m.any():
        return Fit(False)
    aligned = A.align_goods(image, goods, k=1, ignore=mk.dilate(m, 6) > 0)
    if not aligned:
        return Fit(False)
    g = aligned[0]
    c, _, sig = A.moments(m)
    extent = float(4 * sig[0])
    dm = mk.dilate(m, 3 + 0.1 * extent) > 0
    # both without the goods' consensus foreground: the reference's part may have moved off it
    s_good = A.full_structure(g.image) & g.valid
    s_ref = A.full_structure(image)
    p_good, p_ref = s_good & dm, s_ref & dm
    if p_good.sum() < 12 or p_ref.sum() < 12:
        return Fit(False, extent=extent)
    base = iou(p_good, p_ref)
    h, w = m.shape
    # work in the defect's window
    x0, y0, x1, y1 = mk.bbox(dm)
    pad = int(0.5 * extent) + 8
    ys, xs = slice(max(0, y0 - pad), min(h, y1 + pad)), slice(max(0, x0 - pad), min(w, x1 + pad))
    pg, pr, dmw = p_good[ys, xs], p_ref[ys, xs], dm[ys, xs]
    xx, yy = _grid(*pg.shape)
    a_good = pg.astype(np.float32)
    mw = m[ys, xs]
    piv = pivot_of(s_good[ys, xs], s_good[ys, xs] & mw, mw)    # where the part enters the defect
    # the part beyond the pivot turns; what lies before it (inside the dilated mask) stays
    keep = pg & ~mw
    a_move = (pg & mw).astype(np.float32)

    def bend_iou(th: float) -> float:
        mv = ((moved(a_move, *rotation_map(xx, yy, piv, th)) > 0.5) | keep) & dmw
        return iou(mv, pr)
    best_b = (base, 0.0)
    for th in np.arange(-80, 81, 4.0):
        v = bend_iou(th)
        if v > best_b[0] + 1e-9:
            best_b = (v, float(th))
    for th in best_b[1] + np.arange(-3, 3.5, 1.0):
        v = bend_iou(th)
        if v > best_b[0] + 1e-9:
            best_b = (v, float(th))
    cg, cr = A.moments(pg)[0], A.moments(pr)[0]
    best_r = (base, 0.0, 0.0)
    for th in np.arange(-90, 91, 6.0):
        # rotate about the good part's centroid, then move its centroid onto the reference's
        mx, my = rotation_map(xx, yy, cg, th, shift=(cr - cg))
        mv = (moved(a_good, mx, my) > 0.5) & dmw
        v = iou(mv, pr)
        if v > best_r[0] + 1e-9:
            best_r = (v, float(th), float(np.hypot(*(cr - cg))))
    fl = _flow(g.image[ys, xs], image[ys, xs])
    mag = np.hypot(fl[..., 0], fl[..., 1])[(pg | pr)]
    flow = float(np.percentile(mag, 90)) if mag.size else 0.0
    measured = max(best_b[0], best_r[0]) - base >= _MIN_GAIN and max(best_b[0], best_r[0]) >= _MIN_IOU
    return Fit(bool(measured), best_b[1], best_b[0], best_r[1], best_r[2] / max(extent, 1.0), best_r[0],
               flow / max(extent, 1.0), base, extent)


# --------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------
def motion_for(damage_type: str | None, n_entries: int) -> str:
    name = (damage_type or "").lower()
    for motion, words in _KEYWORDS:
        if any(w in name for w in words):
            return motion
    return "shift" if n_entries == 0 else "bend" if n_entries == 1 else "kink"


class WarpGenerator(WindowedGenerator):
    """The structure under the mask bent, kinked, shifted or rotated; the revealed background
    filled (see the module docstring)."""

    info = GeneratorInfo(
        "warp", "1", "damage",
        "The structure under the mask deformed (bent, kinked, shifted or rotated) by a smooth "
        "displacement fitted to the reference defects (else set by strength); the background it "
        "reveals filled from the target and its registered good images",
        options=WarpOptions, learns_from_donors=True, needs_goods=True, default_strength=0.8)
    _needs_frame = True

    def check_params(self, params: dict) -> None:
        if params.get("motion", "auto") not in MOTIONS:
            raise ValueError(f"unknown motion {params['motion']!r}; known: {', '.join(MOTIONS)}")
        if params.get("fill", "auto") not in RM.FILLS:
            raise ValueError(f"unknown fill {params['fill']!r}; known: {', '.join(RM.FILLS)}")

    def _generate(self, crop, cmask, rng, feather, *, strength, frame, goods=None, donors=None,
                  motion="auto", learn=True, fill="auto", jitter=0.5, damage_type=None):
        fits = []
        if learn and donors:
            for i, pair in enumerate(donors):
                img, m = donor_pair(pair, i)
                fits.append(fit_donor(img, m > 0, goods))
        out = warp(frame.image, frame.mask, rng, goods=goods, fits=fits, motion=motion,
                   method=fill, jitter=float(np.clip(jitter, 0, 1)), strength=strength,
                   damage_type=damage_type)
        return out[frame.rows, frame.cols]


def _factor(rng: np.random.Generator, jitter: float) -> float:
    """The seeded size factor: log-uniform in ``e^(±1.2·jitter)`` (0.55..1.8 at 0.5)."""
    return float(math.exp(rng.uniform(-1.2, 1.2) * jitter))


def warp(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, *, goods=None, fits=(),
         motion: str = "auto", method: str = "auto", jitter: float = 0.5, strength: float = 0.8,
         damage_type: str | None = None) -> np.ndarray:
    """The whole frame with the structure under ``mask`` moved (float32 ``H×W×3``)."""
    mask = mask > 0
    h, w = mask.shape
    sc = RM.scene(image, mask, goods, use_goods=method != "inpaint")
    part = (mk.dilate(sc.structure, 2) > 0) & mask
    xx, yy = _grid(h, w)
    measured = [f for f in fits if f.measured]
    fit = measured[int(rng.integers(len(measured)))] if measured else None
    factor = _factor(rng, jitter) * strength / 0.8
    if part.sum() < max(6, 0.02 * mask.sum()) or motion == "elastic":
        return _elastic(image, mask, rng, fit, factor, strength)
    # each painted blob moves its own structure (two bent tips, one mask per lead)
    n_lab, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    alpha = cv2.GaussianBlur(part.astype(np.float32), (0, 0), 0.7)
    mx, my = xx.copy(), yy.copy()
    alpha_out = alpha.copy()
    moved_any = False
    for k in range(1, n_lab):
        blob = lab == k
        part_k = part & blob
        if part_k.sum() < 6:
            continue
        kind = _kind(sc.structure, part_k, blob, motion, damage_type)
        if kind == "bend":
            # the lead beyond the pivot turns into the blob: its source may lie outside the mask
            piv = pivot_of(sc.structure, part_k, blob, rng)
            a_k = cv2.GaussianBlur(_distal(image, sc.structure, part_k, blob, piv).astype(np.float32), (0, 0), 0.7)
            maps = _bend_maps(piv, fit, factor, xx, yy)
            scores = np.array([iou(moved(a_k, cx, cy) > 0.5, blob) for cx, cy in maps])
        else:
            maps = _motion(sc.structure, part_k, blob, kind, fit, factor, xx, yy, rng)
            # the direction whose moved part stays inside its blob best (seeded among near-ties)
            a_k = alpha * blob
            scores = []
            for cx, cy in maps:
                mv = moved(a_k, cx, cy)
                tot = float(mv.sum())
                scores.append(float(mv[blob].sum()) / tot if tot > 0 else 0.0)
            scores = np.array(scores)
        good = np.flatnonzero(scores >= scores.max() - 0.03 - 0.1 * jitter)
        cx, cy = maps[int(good[int(rng.integers(len(good)))])]
        mx[blob], my[blob] = cx[blob], cy[blob]
        if kind == "bend":              # the turned lead's source may lie outside the blob
            alpha_out = np.maximum(alpha_out, a_k)
        moved_any = True
    if not moved_any:
        return _elastic(image, mask, rng, fit, factor, strength)
    base = RM.fill(sc, part, rng, method)
    a_w = (moved(alpha_out, mx, my) * mask)[..., None]
    src = cv2.remap(image.astype(np.float32), mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return a_w * src + (1.0 - a_w) * base


def _kind(structure, part, mask, motion, damage_type) -> str:
    if motion != "auto":
        return motion
    _, n = RM.entries(structure, part, mask)
    return motion_for(damage_type, n)


BEND_ANGLES = (12.0, 20.0, 30.0, 45.0, 60.0, 80.0)   # bend candidates (°) without a measured donor


def _bend_maps(piv, fit, factor, xx, yy) -> list:
    """Bend candidates about ``piv``: the measured angle (× the seeded factor) both ways, else
    every angle of :data:`BEND_ANGLES` both ways — the caller keeps the one whose turned lead
    fills the blob best (the mask is the lead's new place)."""
    if fit is not None and fit.bend_iou > fit.base_iou:
        thetas = [float(np.clip(abs(fit.bend) * factor, 5.0, 90.0))]
    else:
        thetas = [float(np.clip(t * factor, 5.0, 90.0)) for t in BEND_ANGLES]
    return [rotation_map(xx, yy, piv, sgn * t) for t in thetas for sgn in (1, -1)]


def _distal(image, structure, part, mask, piv) -> np.ndarray:
    """``H×W bool``: the part that turns with a bend about ``piv`` — the structure connected to
    the part inside the mask, on the mask's side of the pivot and within reach of it (the lead
    beyond the bend, also where it lies outside the mask: turned, it lands inside). Thin parts
    use the colour outliers (:func:`pipelines.generators.align.structure_mask`) when they cover
    the part, since the goods' consensus foreground is a coarse blob around the body."""
    h, w = mask.shape
    thin = A.structure_mask(A.rgb_u8(image))
    s = thin if (thin & part).sum() >= 0.5 * part.sum() else structure
    s = (mk.dilate(s, 1) > 0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    my_, mx_ = np.nonzero(mask)
    reach = float(np.hypot(mx_ - piv[0], my_ - piv[1]).max()) + 3.0
    c = np.array(A.moments(part)[0], np.float32)
    u = c - np.asarray(piv, np.float32)
    u = u / max(float(np.hypot(*u)), 1e-6)
    side = (xx - piv[0]) * u[0] + (yy - piv[1]) * u[1] > -1.0
    near = np.hypot(xx - piv[0], yy - piv[1]) <= reach
    cand = s & side & near
    n, lab = cv2.connectedComponents(cand.astype(np.uint8), connectivity=8)
    keep = np.unique(lab[cand & part])
    keep = keep[keep > 0]
    out = np.isin(lab, keep) if len(keep) else cand & part
    return out | part


def _motion(structure, part, mask, kind, fit, factor, xx, yy, rng) -> list:
    """Candidate backward maps (one per direction) of one blob's shift / rotate / kink (module
    docstring; a bend: :func:`_bend_maps`)."""
    c, axes, sig = A.moments(part)
    length = float(4 * sig[0])
    cands = []
    if kind in ("shift", "rotate"):
        if fit is not None and fit.rigid_iou > fit.base_iou:
            theta, shift = abs(fit.rotate) * factor, fit.shift * length * factor
        else:
            theta, shift = 15.0 * 0.8 * factor, 0.15 * 0.8 * length * factor
        if kind == "rotate":
            shift = 0.0
        for sgn in (1, -1):
            for k in range(8 if shift > 0.5 else 1):
                a = 2 * math.pi * k / 8 + rng.uniform(-0.3, 0.3)
                cands.append(rotation_map(xx, yy, c, sgn * theta, (shift * math.cos(a), shift * math.sin(a))))
    else:                          # kink
        width = float(2.0 * cv2.distanceTransform(part.astype(np.uint8), cv2.DIST_L2, 5).max())
        o = (fit.flow * length if fit is not None and fit.flow > 0 else (1.0 + 0.8 * width)) * factor
        o = float(np.clip(o, 1.0, 0.5 * length + 1))
        phi = _bump(structure, part, mask)
        normal = axes[:, 1]
        for sgn in (1, -1):
            cands.append((xx - np.float32(sgn * o * normal[0]) * phi, yy - np.float32(sgn * o * normal[1]) * phi))
    return cands


def _bump(structure: np.ndarray, part: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """0 where the structure enters the mask (and at the mask's outline), 1 midway: ``sin(π t)``
    along the part when it crosses the mask, else a smooth bump from the outline inwards."""
    lab, n = RM.entries(structure, part, mask)
    inside = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    ramp = np.clip(inside / max(1.0, 0.5 * float(inside.max())), 0, 1)
    if n >= 2:
        sizes = np.bincount(lab.ravel())[1:]
        k = 1 + int(np.argmax(sizes))
        d1 = RM.dist_to(lab == k)
        d2 = RM.dist_to((lab > 0) & (lab != k))
        t = d1 / np.maximum(d1 + d2, 1e-6)
        phi = np.sin(np.pi * np.clip(t, 0, 1))
        phi = np.minimum(phi, np.clip(inside / 2.0, 0, 1))
    else:
        phi = ramp * ramp * (3 - 2 * ramp)
    return phi.astype(np.float32)


def _elastic(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, fit: Fit | None,
             factor: float, strength: float) -> np.ndarray:
    """A smooth seeded field inside the mask, 0 at its outline (a texture has no part to move)."""
    h, w = mask.shape
    c, _, sig = A.moments(mask)
    size = float(4 * sig[0])
    amp = (fit.flow * size if fit is not None and fit.flow > 0 else max(2.5, 0.08 * size)) * factor
    amp = float(np.clip(amp, 1.0, 0.25 * size + 1))
    cell = max(4.0, 0.35 * size)
    field = np.stack([RM.smooth_noise((h, w), rng, cell), RM.smooth_noise((h, w), rng, cell)], -1)
    inside = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    taper = np.clip(inside / max(1.0, min(0.5 * float(inside.max()), 2 * amp)), 0, 1)
    taper = (taper * taper * (3 - 2 * taper)).astype(np.float32)
    xx, yy = _grid(h, w)
    mx = xx + np.float32(amp) * field[..., 0] * taper
    my = yy + np.float32(amp) * field[..., 1] * taper
    return cv2.remap(image.astype(np.float32), mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


__all__ = ["WarpGenerator", "WarpOptions", "warp", "fit_donor", "Fit", "rotation_map", "MOTIONS"]
