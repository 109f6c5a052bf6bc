"""Defect transfer: a real defect's *appearance* learned from reference donors and re-lit on the
target — the offline ``defect-transfer`` damage generator.

Cut-paste copies a donor's pixels: on a brighter or darker product the patch reads as pasted.
This generator transfers what a defect *does* to the surface instead of what it looks like in
the donor photograph, in the spirit of illumination-ratio transfer and NSA ("natural synthetic
anomalies"): the defect is the donor's deviation from its own local background, and that
deviation is applied to the target's own illumination and colour.

Algorithm (per call; arrays are the working window around the target mask, ``H×W``)
--------------------------------------------------------------------------------------
1. **Donor deviation** (:func:`prepare_donor`, :func:`deviation`). The defect region
   ``hole = dilate(mask, r)`` (``r`` = 2..8 px, so rims and lips are inside) is inpainted
   (``cv2.inpaint``, Telea, on a shrunk copy for large holes; smoothed) → the donor's background
   under the defect. In CIE LAB the deviation is relative: ``log_l = log((L+1)/(L_bg+1))``
   (a crack dark inside with a bright lip is < 0 framed by > 0), the chroma change along the
   background's own hue as a ratio ``log_k`` plus the remaining a/b change (a hue the defect
   brings), an ``opacity`` (how strongly the defect differs from the surface) and the levels
   the ``level`` model needs (see :data:`CHANNELS`). 0 outside ``hole``, tapered at its edge.
   The donor surface's own texture (brushing, grain) is cored out of the lightness deviation
   (:func:`core_surface_texture`), so it does not travel, rotated, onto the target.
2. **Global alignment** (:func:`candidate_affines`, :func:`best_affine`). Principal axes
   (second moments) of the target and donor masks give a target → donor affine map for each of
   the 8 signed axis permutations (the dihedral group in the principal frame) with per-axis
   scales ``σ_donor / σ_target`` (anisotropy ≤ 4 for a stroke-like donor, ≈ 1 for a round one,
   whose texture squashing would streak); the seeded jitter rotates it (±12°·jitter for an
   elongated target, σ ratio ≥ 2, up to ±180°·jitter for a round one) and scales it
   (×e^(±0.12·jitter)). The candidate whose warped (slightly dilated) donor mask has the
   highest IoU with the target mask wins, near-ties (within 0.05) broken by the seed.
3. **Non-rigid refinement** (``warp="field"``, default; :func:`displacement_field`): a smooth
   displacement field ``u`` that makes the warped donor's signed distance function match the
   target's — demons-style iterations ``u ← G_σ * (u − ½ (φ_W(x+u) − φ_T(x)) ∇φ_W / |∇φ_W|²)``
   in a band around the target, σ = 6 % of the mask's length — so the donor defect fills the
   painted shape and does not cross its outline much. ``warp="affine"`` skips it. A small seeded
   Perlin displacement (up to 3 % of the length · jitter) varies the outline in both modes.
4. **Intensity.** ``log_l``, ``log_k`` and the a/b change are scaled by
   ``strength × gain × (1 + 0.3·jitter·perlin)`` (opacity by ``strength``): ``strength`` 0 is
   the input, 1 the donor's full deviation.
5. **Blending** of the deviation at the border of ``Ω = dilate(mask, feather)``:
   ``blend="laplacian"`` (default; :func:`multiband`) — the Laplacian pyramid of the deviation
   weighted by the Gaussian pyramid of ``Ω`` with ``2^levels ≈ feather`` (coarse shading fades
   over the feather band, fine detail stays sharp); ``blend="poisson"`` (:func:`poisson`) —
   the deviation whose Laplacian equals the warped one inside ``Ω`` and which is 0 on its
   border (a harmonic correction: Poisson blending in the log-lightness domain).
6. **Re-lighting** (:func:`apply_deviation`), relative to the target, never copied:
   ``relight="ratio"`` — ``L' = (L+1)·exp(log_l) − 1`` pixel by pixel, chroma
   ``ab·exp(log_k) + Δab_rest·γ`` (γ = the illumination gain donor → target, 0.5..2): a −40 %
   scratch is −40 % of the *target's* L on a bright or a dark product. ``relight="level"`` —
   the same where the defect is faint; where it is opaque its content (the donor's L relative to
   the donor background's low-frequency level, its own colour) replaces the surface, re-lit by
   the target's low-frequency level (σ ≈ the defect's length), so a hole or a stain does not
   show the product's bright and dark bands through it. ``auto`` (default, :func:`relight_for`):
   ``ratio`` for scratch / crack and translucent stain-like types, ``level`` for the rest.
   Applied as an RGB delta.
7. **Composite.** :func:`pipelines.classical.composite` with ``alpha = masks.feather(mask,
   feather)``: pixels outside ``dilate(mask, feather)`` are byte-identical to the input.

Seed → output
-------------
``rng = numpy.random.default_rng(seed)`` draws, in this order: the donor (uniform over the
donors), the rotation and the scale jitter, the intensity draw (``I*`` and a spread), the
tie-break among equally good dihedral candidates, the Perlin gain field, then the two Perlin
displacement fields. The intensity gain is ``(I*/I_donor)^jitter · e^(0.15·jitter·spread)``
clipped to 0.6..1.6, where ``I*`` is uniform in ``[min, max]`` of the donors' mean |log L ratio|
inside their masks (the range seen across donors) and ``spread`` uniform in [−1, 1]. With
``jitter=0`` and one donor the output does not depend on the seed (except among tied
candidates); otherwise different seeds change the donor, pose, intensity, texture and outline.

Params: ``donors`` (list of ``(image H×W×3 uint8, mask H×W)`` — reference real defects of the
type, at least one), ``strength`` (0..1, default 1), ``blend``, ``warp``, ``relight``,
``jitter`` (0..1, default 0.5), ``damage_type`` (picks ``relight="auto"``'s model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from pipelines import masks as mk
from pipelines.generators.appearance import (EPS_L, background, deviation, halo, level, level_sigma,  # noqa: F401
                                             to_lab, window_of)
from pipelines.generators.geometry import (DIHEDRAL, best_affine, candidate_affines, displacement_field,  # noqa: F401
                                           iou, moments, sdf)
from pipelines.classical import (DEFAULT_FEATHER, DONOR_ELONGATED, ELONGATED, donor_pair,
                                 fractal_noise, style_for)
from pipelines.color import rgb_to_lab
from pipelines.generator import GeneratorInfo, option
from pipelines.generators import profiles as P
from pipelines.generators.base import WindowedGenerator

BLENDS = ("laplacian", "poisson")
WARPS = ("field", "affine")
RELIGHTS = ("auto", "ratio", "level")
_CORE_SIGMAS = (1.5,)        # px: the bands of surface texture removed from a donor's deviation
_CORE_K = 1.0                # soft threshold = _CORE_K × the surface texture's robust σ per band
_POISSON_MAX_PX = 40_000     # larger regions get their (smooth) harmonic correction at lower res


@dataclass(frozen=True)
class DefectTransferOptions:
    blend: str = option("laplacian", "boundary blending of the transferred deviation: laplacian "
                                     "(multi-band: soft shading, sharp detail) or poisson "
                                     "(gradient-domain, deviation forced to 0 at the border)",
                        choices=BLENDS)
    warp: str = option("field", "donor → target shape fit: field (moments alignment + a smooth "
                                "displacement field from distance transforms) or affine "
                                "(moments alignment only)", choices=WARPS)
    relight: str = option("auto", "how the defect takes the target's light: ratio (modulates the "
                                  "surface pixel by pixel: thin marks, translucent stains), level "
                                  "(opaque parts keep the donor's content and colour, re-lit by the "
                                  "local low-frequency level: holes, chips, contamination) or auto "
                                  "(ratio for scratch, crack and stain-like types, else level)",
                          choices=RELIGHTS)
    jitter: float = option(0.5, "seeded variation at 1: pose (rotation ±12° for elongated masks, "
                                "up to ±180° for round ones; scale ×0.89..1.13), "
                                "intensity within the donors' range, Perlin texture and outline "
                                "(0 = none)",
                           min=0.0, max=1.0, step=0.05)


# --------------------------------------------------------------------------------------------
# Colour helpers
# --------------------------------------------------------------------------------------------


_lab = to_lab


def _rgb(lab: np.ndarray) -> np.ndarray:
    """LAB → float RGB 0..255 (unrounded), gamut-mapped: an out-of-gamut colour keeps its
    lightness and hue and loses chroma (:func:`pipelines.color.fit_to_srgb`) instead of having its
    channels clipped one by one (which turns a too-bright orange into a flat orange-white)."""
    return P.lab_to_rgb_float(lab)


# --------------------------------------------------------------------------------------------
# Donors
# --------------------------------------------------------------------------------------------
@dataclass
class Donor:
    """A reference defect prepared for transfer (all arrays in the donor's window).

    ``deviation`` ``h×w×9 float32`` (:data:`CHANNELS`; the changes are 0 outside ``support``),
    ``mask`` and ``support`` ``h×w bool`` (the annotated defect / where the deviation lives),
    ``intensity`` the mean |log L ratio| inside the mask; the donor's own range, which a
    transferred defect never leaves: ``log_l_range`` (0.5 / 99.5 % of ``log_l`` on the
    support), ``L_hi`` and ``C_hi`` (99.5 % of its lightness and chroma there)."""
    deviation: np.ndarray
    mask: np.ndarray
    support: np.ndarray
    intensity: float
    log_l_range: tuple[float, float] = (-np.inf, np.inf)
    L_hi: float | None = None
    C_hi: float | None = None


def _as_pair(pair: Any, i: int) -> tuple[np.ndarray, np.ndarray]:
    img, m = donor_pair(pair, i)
    return img, m > 0


CHANNELS = ("log_l", "log_k", "rest_a", "rest_b", "opacity", "log_s", "log_lbg", "a_d", "b_d")
_BLENDED = 6                 # channels blended at the border (the rest are levels, not changes)


def core_surface_texture(log_l: np.ndarray, L: np.ndarray, hole: np.ndarray, r: int) -> np.ndarray:
    """Remove the donor surface's own texture from the lightness deviation ``log_l`` (``H×W``).

    The inpainted background is smooth, so the product's texture under the defect (brushing,
    grain) would travel with the deviation — rotated with the donor, it would cross the target's
    own texture. Per band (differences of Gaussians at σ = :data:`_CORE_SIGMAS` px) the
    deviation inside ``hole`` is soft-thresholded at :data:`_CORE_K` × the robust σ of the same
    band of log L in a ring around the hole (the surface's texture amplitude): the surface
    texture goes, stronger defect detail (rims, grains, crack edges) stays, shrunk by the
    threshold."""
    ring = (mk.dilate(hole.astype(np.uint8) * 255, 2 * r + 4) > 0) & ~hole
    if ring.sum() < 16:
        return log_l
    logL = np.log(np.maximum(L, 0) + EPS_L).astype(np.float32)
    x = log_l.astype(np.float32)
    out = np.zeros_like(x)
    for sigma in _CORE_SIGMAS:
        x_low = cv2.GaussianBlur(x, (0, 0), sigma)
        t_low = cv2.GaussianBlur(logL, (0, 0), sigma)
        band, t_band = x - x_low, logL - t_low
        noise = 1.4826 * float(np.median(np.abs(t_band[ring] - np.median(t_band[ring]))))
        out += np.sign(band) * np.maximum(np.abs(band) - _CORE_K * noise, 0.0)
        x, logL = x_low, t_low
    return np.where(hole, out + x, log_l).astype(np.float32)


def prepare_donor(image: np.ndarray, mask: np.ndarray) -> Donor:
    """The deviation of a real defect from its inpainted background (see the module doc, step 1).
    ``image`` ``H×W×3 uint8``, ``mask`` ``H×W bool`` (non-empty)."""
    r = halo(mask)
    size = 4.0 * float(moments(mask)[2][0])
    ys, xs = window_of(mask, 3 * r + 8)
    rgb, m = image[ys, xs], mask[ys, xs]
    hole = mk.dilate(m.astype(np.uint8) * 255, r) > 0
    bg = background(rgb, hole, smooth=max(1.0, r / 2))
    lab = _lab(rgb)
    dev = deviation(lab, _lab(bg), level_sigma(size))
    dev[..., 0] = core_surface_texture(dev[..., 0], lab[..., 0], hole, r)
    taper = np.clip(cv2.distanceTransform(hole.astype(np.uint8), cv2.DIST_L2, 3) / 1.5, 0, 1)
    dev[..., :_BLENDED] *= taper[..., None].astype(np.float32)
    lo, hi = np.percentile(dev[hole, 0], [0.5, 99.5])
    chroma = np.sqrt((lab[hole, 1:] ** 2).sum(-1))
    return Donor(dev, m, hole, float(np.abs(dev[m, 0]).mean()), (float(min(lo, 0.0)), float(max(hi, 0.0))),
                 float(np.percentile(lab[hole, 0], 99.5)), float(np.percentile(chroma, 99.5)))


def apply_deviation(lab: np.ndarray, dev: np.ndarray, level_sigma: float, model: str = "ratio",
                    L_hi: float | None = None, C_hi: float | None = None) -> np.ndarray:
    """Apply a (warped, scaled) deviation (:func:`deviation`'s channels) to a target ``H×W×3`` LAB.

    ``ratio``: ``log(L'+1) = log_l + log(L+1)`` — the defect modulates the target's own
    lightness pixel by pixel (stains, scratches, cracks: a surface change lit like the surface).
    ``level``: where the defect is opaque (``o`` = opacity) its content replaces the surface and is
    re-lit by the target's low-frequency level ``S`` (the target's L blurred by ``level_sigma``):
    ``log(L'+1) = log_l + o·log_s + (1−o)·log(L+1) + o·log(S+1)`` (holes, chips, missing parts:
    what shows through does not follow the surface's bright and dark bands).
    Chroma: ``ab' = ab·exp(log_k) + (rest_a, rest_b)·γ`` with the illumination gain
    ``γ = clip((L'+1)/(L_d+1), 0.5, 2)``, ``L_d + 1 = exp(log_l + log_lbg)`` the defect's own
    lightness in the donor; ``level`` mixes in the donor's own colour where it is opaque:
    ``(1−o)·ab' + o·(a_d, b_d)·γ`` (no colour cast is carried over: the low-frequency a/b
    difference between two windows is mostly the materials', not the light's).

    Highlights are bounded by the donor's own range (``L_hi``, ``C_hi``: its brightest lightness
    and highest chroma; None = unbounded): where the defect brightens a pixel, its lightness is
    compressed smoothly towards ``max(L, L_hi)`` and a chroma increase towards ``max(C, C_hi)``
    (:func:`pipelines.generators.profiles.soft_ceiling`) — a bright lip on a bright product
    never runs into white, a chroma ratio on a saturated one never into the gamut's edge."""
    L = np.maximum(lab[..., 0], 0.0).astype(np.float32)
    log_l = dev[..., 0] + np.log(L + EPS_L)
    if model == "level":
        S = np.maximum(level(L, level_sigma), 0)
        o = np.clip(dev[..., 4], 0.0, 1.0)
        log_l += o * (dev[..., 5] + np.log(S + EPS_L) - np.log(L + EPS_L))
    out = np.empty_like(lab)
    out[..., 0] = np.clip(np.exp(log_l) - EPS_L, 0.0, 100.0)
    if L_hi is not None:
        out[..., 0] = P.soft_ceiling(out[..., 0], L, np.maximum(L, min(float(L_hi), 99.5)))
    gain = np.clip((out[..., 0] + EPS_L) / np.exp(dev[..., 0] + dev[..., 6]), 0.5, 2.0)[..., None]
    out[..., 1:] = lab[..., 1:] * np.exp(dev[..., 1:2]) + dev[..., 2:4] * gain
    if model == "level":
        o = o[..., None]
        out[..., 1:] = (1 - o) * out[..., 1:] + o * dev[..., 7:9] * gain
    if C_hi is not None:
        c_in = np.sqrt((lab[..., 1:].astype(np.float32) ** 2).sum(-1))
        c_out = np.sqrt((out[..., 1:] ** 2).sum(-1))
        bounded = P.soft_ceiling(c_out, c_in, np.maximum(c_in, float(C_hi)))
        out[..., 1:] *= (bounded / np.maximum(c_out, 1e-6))[..., None]
    return out


# --------------------------------------------------------------------------------------------
# Geometry: moments alignment over the dihedral group, then a displacement field
# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# Blending of the deviation
# --------------------------------------------------------------------------------------------
def multiband(dev: np.ndarray, weight: np.ndarray, levels: int | None = None) -> np.ndarray:
    """Laplacian-pyramid blend of ``dev`` (``H×W×C``) with zero: ``Σ_k L_k(dev)·G_k(weight)``."""
    h, w = weight.shape
    if levels is None:
        levels = int(np.clip(math.floor(math.log2(max(1, min(h, w)) / 6)), 0, 5))
    gp, wp = [dev.astype(np.float32)], [weight.astype(np.float32)]
    for _ in range(levels):
        gp.append(cv2.pyrDown(gp[-1]))
        wp.append(cv2.pyrDown(wp[-1]))
    out = gp[-1] * wp[-1][..., None]
    for k in range(levels - 1, -1, -1):
        size = (gp[k].shape[1], gp[k].shape[0])
        up = cv2.pyrUp(gp[k + 1], dstsize=size)
        up = up.reshape(gp[k].shape)
        lap = gp[k] - up
        out = cv2.pyrUp(out, dstsize=size).reshape(gp[k].shape) + lap * wp[k][..., None]
    return out


def _harmonic(boundary: np.ndarray, omega: np.ndarray) -> np.ndarray:
    """``c`` with ``Δc = 0`` on ``omega`` and ``c = boundary`` on the pixels around it
    (``H×W×C``); pixels off the image are Neumann (not counted). 0 outside ``omega``.
    Sparse 5-point Laplacian over the pixels of ``omega``, solved by SuperLU."""
    h, w = omega.shape
    idx = -np.ones((h, w), np.int64)
    ys, xs = np.nonzero(omega)
    n = ys.size
    idx[ys, xs] = np.arange(n)
    rows, cols = [], []
    diag = np.zeros(n)
    rhs = np.zeros((n, boundary.shape[2]))
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        ny, nx = ys + dy, xs + dx
        ok = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        diag[ok] += 1
        nyc, nxc = np.clip(ny, 0, h - 1), np.clip(nx, 0, w - 1)
        inner = ok & omega[nyc, nxc]
        rows.append(np.flatnonzero(inner))
        cols.append(idx[nyc[inner], nxc[inner]])
        outer = ok & ~omega[nyc, nxc]
        rhs[outer] += boundary[nyc[outer], nxc[outer]]
    rows_a, cols_a = np.concatenate(rows), np.concatenate(cols)
    diag = np.maximum(diag, 1) + 1e-4      # a part of omega with no border is pinned to c = 0
    from scipy import sparse    # here, not at import: the registry imports this module for every backend list
    from scipy.sparse.linalg import splu
    a = sparse.csc_matrix((np.concatenate([diag, -np.ones(rows_a.size)]),
                           (np.concatenate([np.arange(n), rows_a]), np.concatenate([np.arange(n), cols_a]))),
                          shape=(n, n))
    sol = splu(a).solve(rhs)
    out = np.zeros(boundary.shape, np.float32)
    out[ys, xs] = sol
    return out


def poisson(dev: np.ndarray, omega: np.ndarray) -> np.ndarray:
    """The deviation whose Laplacian equals ``dev``'s inside ``omega`` and which is 0 on its
    boundary: ``dev + c`` with ``c`` harmonic, ``c = −dev`` around ``omega`` (0 outside).
    The correction is smooth, so large regions get it at a lower resolution."""
    h, w = omega.shape
    if not omega.any():
        return np.zeros_like(dev)
    f = min(1.0, math.sqrt(_POISSON_MAX_PX / max(1, int(omega.sum()))))
    if f < 1.0:
        size = (max(4, round(w * f)), max(4, round(h * f)))
        d_lo = np.concatenate([cv2.resize(dev[..., i:i + 1], size, interpolation=cv2.INTER_AREA
                                          ).reshape(size[1], size[0], 1) for i in range(dev.shape[2])], -1)
        o_lo = cv2.resize(omega.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
        c = cv2.resize(_harmonic(-d_lo, o_lo), (w, h), interpolation=cv2.INTER_LINEAR)
        c = c.reshape(dev.shape)
    else:
        c = _harmonic(-dev, omega)
    return np.where(omega[..., None], dev + c, 0.0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------
class DefectTransferGenerator(WindowedGenerator):
    """A defect whose appearance is learned from reference real defects of its type and re-lit
    on the target (relative deviation in LAB, warped onto the painted mask, multi-band or Poisson
    blended). See the module docstring for the algorithm and the seed → output mapping."""

    info = GeneratorInfo(
        "defect-transfer", "2", "damage",
        "A reference real defect's appearance (its deviation from its own background) warped onto "
        "the mask and re-lit on the target's illumination and colour; multi-band or Poisson blended",
        options=DefectTransferOptions, needs_donors=True)
    _context = 12

    def check_params(self, params: dict) -> None:
        if not params.get("donors"):
            kind = params.get("damage_type")
            raise ValueError(
                "defect-transfer learns a defect's appearance from real ones: it needs at least one "
                f"reference real defect of this type {'(' + repr(kind) + ') ' if kind else ''}with its "
                "mask — import or accept a real defect image (role 'reference'), or pick the perlin "
                "generator")

    def _generate(self, crop, cmask, rng, feather, *, strength, donors, blend="laplacian",
                  warp="field", relight="auto", jitter=0.5, damage_type=None):
        relight_model = relight
        _check_choices(blend, warp, relight)
        jitter = float(np.clip(jitter, 0.0, 1.0))
        pairs = [_as_pair(p, i) for i, p in enumerate(donors)]
        h, w = cmask.shape
        target = cmask > 0

        # 1. The donor (seeded) and its deviation (cached per donor); the intensity range seen
        #    across donors.
        i = int(rng.integers(len(pairs)))
        donor = P.cached("transfer-donor", P.donor_key(*pairs[i]), lambda: prepare_donor(*pairs[i]))
        intensities = [P.cached("transfer-intensity", P.donor_key(*pair), lambda pair=pair: _quick_intensity(*pair))
                       for pair in pairs]

        # 2. Pose: moments alignment over the dihedral group, jittered, best IoU wins. A round
        #    target may turn the donor any way (±180°·jitter), an elongated one (σ ratio ≥ 2)
        #    only by ±12°·jitter. An elongated target (warp="field") is instead laid along the
        #    skeletons (step 3).
        _, _, sig_t = moments(target)
        roundness = float(np.clip(2.0 - sig_t[0] / sig_t[1], 0.0, 1.0))
        angle = math.radians(12.0 + 168.0 * roundness) * jitter * rng.uniform(-1, 1)
        scale = math.exp(0.12 * jitter * rng.uniform(-1, 1))
        lo, hi = min(intensities), max(intensities)
        wanted = rng.uniform(lo, hi)
        spread = rng.uniform(-1, 1)
        strips = _strips(target, donor.mask) if warp == "field" else None
        if strips is None:
            affine, _ = best_affine(target, donor.mask,
                                    candidate_affines(target, donor.mask, angle, scale), rng)

        # 3. Seeded Perlin fields (gain, outline wobble), then the fit to the painted mask: along
        #    the two skeletons for an elongated target (the wobble kept within half its width so
        #    the defect stays on the stroke), else the non-rigid refinement (the warped donor
        #    mask's distance function onto the target's); one remap of the donor.
        size = 4.0 * float(moments(target)[2][0])              # ≈ the target's length
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        gain_noise = fractal_noise((h, w), rng, cell=max(4.0, size / 3), octaves=3)
        amp = jitter * float(np.clip(0.08 * size, 0.5, 6.0))
        if strips is not None:
            amp = min(amp, 0.5 * strips[0].mean_width)
        cell = max(6.0, size / 2)
        wobble = np.stack([fractal_noise((h, w), rng, cell, octaves=2),
                           fractal_noise((h, w), rng, cell, octaves=2)], -1) * amp
        if strips is not None:
            mx, my, zoom_out = _strip_map(strips, xx + wobble[..., 0], yy + wobble[..., 1], rng)
        else:
            mx, my, zoom_out = _affine_map(target, donor.mask, affine, xx + wobble[..., 0], yy + wobble[..., 1],
                                           size, warp)
        dev = _remap(donor.deviation, mx, my, zoom_out)

        # 4. Intensity: strength × gain (within the donors' range) × Perlin modulation.
        gain = (wanted / max(intensities[i], 1e-6)) ** jitter if hi > 0 else 1.0
        gain = float(np.clip(gain * math.exp(0.15 * jitter * spread), 0.6, 1.6))
        g = strength * gain * (1.0 + 0.3 * jitter * gain_noise)
        dev[..., :4] *= g[..., None].astype(np.float32)
        dev[..., 4:6] *= strength

        # 5. Blend the deviation at the border of Ω = dilate(mask, feather).
        _blend(dev, mk.dilate(cmask, feather) > 0, feather, blend)
        # the gain and the modulation never take the lightness change past the donor's own range
        dev[..., 0] = np.clip(dev[..., 0], *donor.log_l_range)

        # 6. Re-light the target (ratio or level model; highlights bounded by the donor's own
        #    lightness and chroma), applied as an RGB delta so that pixels with no deviation keep
        #    their exact values; 7. the base class composites.
        lab = _lab(crop)
        model = relight_model if relight_model != "auto" else relight_for(damage_type)
        out = apply_deviation(lab, dev, level_sigma(size), model, donor.L_hi, donor.C_hi)
        return crop.astype(np.float32) + (_rgb(out) - _rgb(lab))


def _check_choices(blend: str, warp: str, relight: str) -> None:
    if blend not in BLENDS:
        raise ValueError(f"unknown blend {blend!r}; known: {', '.join(BLENDS)}")
    if warp not in WARPS:
        raise ValueError(f"unknown warp {warp!r}; known: {', '.join(WARPS)}")
    if relight not in RELIGHTS:
        raise ValueError(f"unknown relight {relight!r}; known: {', '.join(RELIGHTS)}")


def _strips(target: np.ndarray, donor_mask: np.ndarray):
    """``(target strip, donor strip)`` when both are elongated (warp 'field' lays the donor along
    the skeletons), else None; the donor's strip is cached per mask."""
    ts = P.strip_of(target) if P.elongation(target) >= ELONGATED else None
    ds = P.cached("strip", P.mask_key(donor_mask), lambda: P.strip_of(donor_mask)
                  if P.elongation(donor_mask) >= DONOR_ELONGATED else None) if ts is not None else None
    return (ts, ds) if ts is not None and ds is not None else None


def _strip_map(strips, px: np.ndarray, py: np.ndarray, rng: np.random.Generator):
    """The donor coordinates of each target pixel along the two skeletons (seeded reverse,
    mirror and shift) and the zoom (donor px per target px)."""
    ts, ds = strips
    reverse, mirror, shift = bool(rng.random() < 0.5), bool(rng.random() < 0.5), float(rng.random())
    mx, my = P.strip_map(ts, ds, px, py, px.shape, reverse=reverse, mirror=mirror, shift=shift)
    return mx, my, float(np.median(ds.width)) / max(float(np.median(ts.width)), 0.5)


def _affine_map(target: np.ndarray, donor_mask: np.ndarray, affine: np.ndarray, px: np.ndarray,
                py: np.ndarray, size: float, warp: str):
    """The donor coordinates of each target pixel: the non-rigid refinement (warp 'field': the
    warped donor mask's distance function onto the target's) then the affine pose; the zoom."""
    h, w = target.shape
    if warp == "field":
        warped = cv2.warpAffine(donor_mask.astype(np.float32), affine, (w, h),
                                flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP) > 0.5
        u = displacement_field(target, warped, size)
    else:
        u = np.zeros((h, w, 2), np.float32)
    px, py = px + u[..., 0], py + u[..., 1]
    mx = (affine[0, 0] * px + affine[0, 1] * py + affine[0, 2]).astype(np.float32)
    my = (affine[1, 0] * px + affine[1, 1] * py + affine[1, 2]).astype(np.float32)
    return mx, my, math.sqrt(abs(np.linalg.det(affine[:, :2])))     # donor px per target px


def _remap(dev: np.ndarray, mx: np.ndarray, my: np.ndarray, zoom_out: float) -> np.ndarray:
    """One remap of the donor's deviation (anti-aliased first when it shrinks by > 1.3)."""
    if zoom_out > 1.3:
        dev = cv2.GaussianBlur(dev, (0, 0), 0.45 * zoom_out)
    h, w = mx.shape
    return cv2.remap(dev, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                     borderValue=0).reshape(h, w, dev.shape[2])


def _blend(dev: np.ndarray, omega: np.ndarray, feather: float, blend: str) -> None:
    """Blend the blended channels of ``dev`` (in place) at the border of ``omega``: Poisson, or
    multi-band with 2^levels ≈ feather."""
    if blend == "poisson":
        dev[..., :_BLENDED] = poisson(dev[..., :_BLENDED], omega)
    else:
        levels = int(np.clip(round(math.log2(max(1.0, feather))), 1, 4))
        dev[..., :_BLENDED] = multiband(dev[..., :_BLENDED], omega.astype(np.float32), levels)


_TRANSLUCENT = ("stain", "oil", "liquid", "color", "colour", "tint")


def relight_for(damage_type: str | None) -> str:
    """``ratio`` for marks that follow the surface's shading and let its texture show through:
    thin ones (classical styles ``scratch`` and ``crack``) and translucent films (a type name
    with stain, oil, liquid, colour or tint); ``level`` for everything else (holes, chips,
    missing or misplaced parts, contamination, glue: opaque material with its own colour)."""
    name = (damage_type or "").lower()
    if style_for(damage_type) in ("scratch", "crack") or any(w in name for w in _TRANSLUCENT):
        return "ratio"
    return "level"


def _quick_intensity(image: np.ndarray, mask: np.ndarray) -> float:
    """A donor's mean |log L ratio| inside its mask against the median L of a ring around it —
    a cheap stand-in for :func:`prepare_donor`'s ``intensity`` (used for the range only)."""
    r = halo(mask)
    ys, xs = window_of(mask, 3 * r + 8)
    m = mask[ys, xs].astype(np.uint8) * 255
    ring = (mk.dilate(m, 2 * r + 4) > 0) & ~(mk.dilate(m, r) > 0)
    L = _lab(image[ys, xs])[..., 0]
    ref = float(np.median(L[ring])) if ring.any() else float(np.median(L))
    return float(np.abs(np.log((L[m > 0] + EPS_L) / (ref + EPS_L))).mean())


__all__ = ["DefectTransferGenerator", "DefectTransferOptions", "Donor", "prepare_donor", "halo",
           "background", "window_of", "moments", "to_lab",
           "candidate_affines", "best_affine", "displacement_field", "multiband", "poisson",
           "BLENDS", "WARPS"]
