"""``remove``: a part or a segment disappears — cut leads, missing or misplaced components, cuts,
missing thread.

The masked region shows the product's *background* where the target shows structure: the
structure pixels under the mask are replaced by background copied from elsewhere in the target
and in the product's good images registered to it (:mod:`pipelines.generators.align`: structure
vs background, offsets at the background's period, ring-matched pieces, ``cv2.inpaint`` for what
no source covers — and for everything when ``fill="inpaint"``). Background pixels under the mask
stay as they are.

Algorithm (the whole image around the window: ``frame``)
--------------------------------------------------------
1. **Registration.** Up to two goods nearest the target (near-identical ones — the target itself
   is usually among the goods — skipped) are registered by ECC (rotation search when a product
   lies in another orientation); those that do not align are not used.
2. **Structure** ``S``: the target's pixels unlike its background colours (frame colour model),
   united with the goods' consensus foreground; ``P = dilate(S, 2) ∩ mask`` (the 2 px take the
   structure's dark edges and shadow along). A mask without structure (a texture, or a mask on
   bare background) has ``P = mask``: its content is replaced by the background texture from
   elsewhere (seeded place: ``jitter``).
3. **What goes** (``mode``). ``entries``: the places where the structure leaves the mask (parts
   of ``S`` just outside it, next to ``P``).

   - ``remove`` — every pixel of ``P`` except a seeded ragged stub at the entries (up to
     ``0.35·jitter`` of the part's length, its edge modulated by noise): a lead cut where it
     enters the mask, a part missing.
   - ``cut`` — a band across a thin structure: along the structure, from the *near* entry (the
     one attached to the larger outside part) to the far one, ``t = d_near / (d_near + d_far)``;
     the band ``a < t < b`` is removed (``a`` ∈ 0.05..0.3, ``b − a`` ∈ 0.3..0.55, seeded) and the
     far piece ``t ≥ b`` is redrawn moved sideways by ``0.4..1`` × the structure's width + 1 px
     (seeded sign), the move tapering to 0 over the last quarter toward the far entry (it stays
     attached to what lies outside the mask, which is never changed).
   - ``auto`` — ``cut`` for a damage type named ``cut…`` when the structure crosses the mask (two
     entries or more), else ``remove``.
4. **Fill** of the removed pixels (:func:`pipelines.generators.align.fill_background`), then the
   far piece of a cut on top. The base class composites: outside ``dilate(mask, feather)`` the
   input's bytes.

Seed → output: the tie-break among equally well-matching background pieces (and, without
structure, how far from the best match the copied texture may come: ``jitter``), the stub length
and its ragged edge, a cut's band and offset.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from pipelines import masks as mk
from pipelines.generator import GeneratorInfo, option
from pipelines.generators import align as A
from pipelines.generators import fill as F
from pipelines.generators.base import WindowedGenerator

MODES = ("auto", "remove", "cut")
FILLS = ("auto", "inpaint")
_CUT_WORDS = ("cut",)
_WHOLE_WORDS = ("missing", "misplac", "absent", "lost")     # a whole part gone: no stub


@dataclass(frozen=True)
class RemoveOptions:
    mode: str = option("auto", "what disappears: remove (the structure under the mask, a ragged stub "
                               "left where it enters), cut (a band across a thin structure, the far "
                               "end moved a little) or auto (cut for a type named cut… when the "
                               "structure crosses the mask, else remove)", choices=MODES)
    fill: str = option("auto", "where the background comes from: auto (the target's own background "
                               "and the registered good images, copied at the background's period; "
                               "cv2.inpaint for what they cannot cover) or inpaint (cv2.inpaint only)",
                       choices=FILLS)
    jitter: float = option(0.5, "seeded variation: stub length and ragged edge, cut band and offset, "
                                "where texture without structure is copied from (0 = least)",
                           min=0.0, max=1.0, step=0.05)


def entries(structure: np.ndarray, part: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, int]:
    """``(labels, n)``: the places where ``structure`` leaves ``mask`` next to ``part`` — the
    structure pixels within 2 px outside the mask touching ``dilate(part, 2)``, labelled 1..n by
    8-connected component."""
    near = (mk.dilate(mask, 2) > 0) & ~mask & structure & (mk.dilate(part, 2) > 0)
    n, lab = cv2.connectedComponents(near.astype(np.uint8), connectivity=8)
    return lab, n - 1


def dist_to(m: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel to the True pixels of ``m`` (inf-like when none)."""
    if not m.any():
        return np.full(m.shape, 1e6, np.float32)
    return cv2.distanceTransform((~m).astype(np.uint8), cv2.DIST_L2, 5)


def smooth_noise(shape: tuple[int, int], rng: np.random.Generator, cell: float) -> np.ndarray:
    """Smooth noise in about [-1, 1] (upsampled normal grid)."""
    h, w = shape
    gh, gw = max(2, int(math.ceil(h / cell)) + 1), max(2, int(math.ceil(w / cell)) + 1)
    g = rng.normal(0, 1, (gh, gw)).astype(np.float32)
    return np.clip(cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC) / 1.5, -1.5, 1.5)


@dataclass
class Scene:
    """The target, its structure and where background may come from (the whole frame)."""
    image: np.ndarray
    mask: np.ndarray
    structure: np.ndarray
    aligned: list
    offsets: list


def scene(image: np.ndarray, mask: np.ndarray, goods, use_goods: bool = True) -> Scene:
    """Registration, structure and background offsets of a frame (shared with ``warp``)."""
    aligned = A.align_goods(image, goods, k=2, ignore=mk.dilate(mask, 6) > 0) if use_goods and goods else []
    s = A.target_structure(image, aligned, goods if use_goods else None)
    offsets = A.background_offsets(image, ~s & ~(mk.dilate(mask, 2) > 0))
    return Scene(image, mask, s, aligned, offsets)


def fill(sc: Scene, region: np.ndarray, rng: np.random.Generator, method: str = "auto",
         explore: float = 0.0, periodic: bool = True) -> np.ndarray:
    """``H×W×3`` float32: the frame with ``region`` filled with background."""
    if method == "inpaint":
        return F.inpaint(sc.image.astype(np.float32), region, sc.structure)
    srcs = F.sources_for(sc.image, sc.structure, region | sc.mask, sc.aligned)
    return F.fill_background(sc.image, region, sc.structure, srcs, rng, sc.offsets, explore=explore,
                             periodic=periodic).image


class RemoveGenerator(WindowedGenerator):
    """A part or segment under the mask disappears, replaced by the product's background (see the
    module docstring)."""

    info = GeneratorInfo(
        "remove", "1", "damage",
        "The structure under the mask disappears (a cut lead, a missing part, a cut): its pixels are "
        "replaced by the product's background from the target and its registered good images",
        options=RemoveOptions, needs_goods=True, takes_strength=False)
    _needs_frame = True

    def check_params(self, params: dict) -> None:
        if params.get("mode", "auto") not in MODES:
            raise ValueError(f"unknown mode {params['mode']!r}; known: {', '.join(MODES)}")
        if params.get("fill", "auto") not in FILLS:
            raise ValueError(f"unknown fill {params['fill']!r}; known: {', '.join(FILLS)}")

    def _generate(self, crop, cmask, rng, feather, *, strength, frame, goods=None, mode="auto",
                  fill="auto", jitter=0.5, damage_type=None):
        out = remove(frame.image, frame.mask, rng, goods=goods, mode=mode, method=fill,
                     jitter=float(np.clip(jitter, 0, 1)), damage_type=damage_type)
        return out[frame.rows, frame.cols]


def remove(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, *, goods=None,
           mode: str = "auto", method: str = "auto", jitter: float = 0.5,
           damage_type: str | None = None) -> np.ndarray:
    """The whole frame with the structure under ``mask`` removed (float32 ``H×W×3``)."""
    mask = mask > 0
    sc = scene(image, mask, goods, use_goods=method != "inpaint")
    part = (mk.dilate(sc.structure, 3) > 0) & mask
    if part.sum() < max(4, 0.02 * mask.sum()):            # nothing to remove: replace the texture
        return fill(sc, mask, rng, method, explore=max(0.5, jitter), periodic=False)
    lab, n = entries(sc.structure, part, mask)
    name = (damage_type or "").lower()
    if mode == "auto":
        mode = "cut" if n >= 2 and any(w in name for w in _CUT_WORDS) else "remove"
    if mode == "cut" and n >= 2:
        return _cut(sc, part, lab, n, rng, method, jitter)
    # remove: everything but a seeded ragged stub where the structure enters the mask
    hole = part.copy()
    if n and not any(w in name for w in _WHOLE_WORDS):
        ent = lab > 0
        d = dist_to(ent)
        length = 4.0 * float(A.moments(part)[2][0])
        stub = rng.uniform(0.0, 0.35) * jitter * length
        noise = smooth_noise(part.shape, rng, max(3.0, 0.1 * length))
        keep = part & (d <= stub * (1.0 + 0.6 * noise)) & (sc.structure | (d <= 1.5))
        hole &= ~keep
    return fill(sc, hole, rng, method)


def _cut(sc: Scene, part: np.ndarray, lab: np.ndarray, n: int, rng: np.random.Generator,
         method: str, jitter: float) -> np.ndarray:
    """A band across the structure removed, the far piece moved sideways."""
    h, w = part.shape
    # the near entry: the one attached to the larger part of the structure outside the mask
    outside = sc.structure & ~sc.mask
    n_out, out_lab, st, _ = cv2.connectedComponentsWithStats(outside.astype(np.uint8), connectivity=8)
    sizes = []
    for k in range(1, n + 1):
        comps = np.unique(out_lab[lab == k])
        comps = comps[comps > 0]
        sizes.append(int(st[comps, cv2.CC_STAT_AREA].max()) if comps.size else 0)
    sizes = np.array(sizes, float) * np.exp(rng.uniform(-0.05, 0.05, n))
    near_k = 1 + int(np.argmax(sizes))
    d_near = dist_to(lab == near_k)
    d_far = dist_to((lab > 0) & (lab != near_k))
    t = d_near / np.maximum(d_near + d_far, 1e-6)
    a = rng.uniform(0.05, 0.3)
    b = min(0.85, a + rng.uniform(0.3, 0.55))
    hole = part & (t > a)
    far = part & (t >= b) & sc.structure
    base = fill(sc, hole, rng, method)
    if not far.any():
        return base
    # the far piece moved across the structure (its axis: the part's major axis)
    _, axes, sig = A.moments(part)
    normal = axes[:, 1]
    width = float(2.0 * cv2.distanceTransform(part.astype(np.uint8), cv2.DIST_L2, 5).max())
    mag = (rng.uniform(0.4, 1.0) * width + 1.0) * (0.5 + jitter)
    off = normal * mag * (1 if rng.random() < 0.5 else -1)
    taper = np.clip((1.0 - t) / 0.25, 0.0, 1.0)            # 0 at the far entry
    taper = (taper * taper * (3 - 2 * taper)).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # backward map: the pixel at x shows the far piece's pixel at x − off·taper
    mx = xx - np.float32(off[0]) * taper
    my = yy - np.float32(off[1]) * taper
    alpha = cv2.GaussianBlur(far.astype(np.float32), (0, 0), 0.6)
    src = cv2.remap(sc.image.astype(np.float32), mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    a_w = cv2.remap(alpha, mx, my, cv2.INTER_LINEAR, borderValue=0)[..., None] * sc.mask[..., None]
    return a_w * src + (1 - a_w) * base


__all__ = ["RemoveGenerator", "RemoveOptions", "remove", "scene", "fill", "entries", "Scene", "MODES", "FILLS"]
