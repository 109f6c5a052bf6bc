"""Orientation of a part in an image: rigid registration to a reference pose, cheap enough to run
before every PatchCore forward (≈ 1 ms per 256 px image on 2 CPU cores).

PatchCore compares each test patch with normal patches; a part that lies at another angle than
every training image gives no close normal patch anywhere. Two remedies (``PatchCore(orient=…)``):
bring each image to one canonical pose first (:class:`Canonicalizer`, this module), or put the
training images in many poses into the bank (``orient="augment"``, :func:`augment_views`).

Registration (Fourier–Mellin without scale, then phase correlation):

1. ``gray [n x n]`` (``n = 128``), mean removed, Hann window → log-magnitude spectrum, centred.
   The magnitude spectrum ignores translation and rotates with the image.
2. Spectrum → polar ``[A x R]`` (``A = 360`` angles, radii 3 … 0.8·n/2), each radius ring
   centred on its mean (what is left is the spectrum's orientation structure).
3. Rotation modulo 180°: the circular cross-correlation of the image's polar spectrum with the
   reference's along the angle axis, summed over radii (one FFT per ring), folded to 180° (the
   spectrum of a real image is point-symmetric); sub-degree peak by parabolic interpolation. Its
   *sharpness* (peak over the correlation's spread) says whether the image has an orientation at
   all (a round, isotropic part has none).
4. 0° or 180° and the translation: the image rotated by each candidate is phase-correlated with
   the reference (phase correlation against the reference's cached spectrum); the higher
   response wins.

:func:`orientation_spread` is the rule ``orient="auto"`` uses on train/good: the share of training
images whose angle to the reference, modulo 180°, exceeds 10° (with a sharp spectrum peak). Aligned
products (MVTec transistor, the demo) give 0 and keep the plain model; parts lying in any
orientation give most of them.

Poses are 2×3 affine matrices ``M`` in pixels of the working image (``size × size``):
``canonical = warpAffine(image, M)``; ``map_original = warpAffine(map_canonical, M⁻¹)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

N = 128                   # registration resolution (px)
ANGLES = 360              # polar samples over 360°
R_LO, R_HI = 3, 0.8       # radii used: 3 px … 0.8·N/2 (no DC, no corners of the spectrum)
GAIN_MIN = 0.3            # orient="auto": canonical when turning the train images gains more NCC
ORIENT_MODES = ("auto", "none", "canonical", "augment")


def gray(image: np.ndarray, n: int = N) -> np.ndarray:
    """RGB / grey uint8 ``[H x W (x 3)]`` → float32 ``[n x n]``, mean 0."""
    g = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    g = cv2.resize(g, (n, n), interpolation=cv2.INTER_AREA).astype(np.float32)
    return g - g.mean()


_HANN: dict[int, np.ndarray] = {}


def _hann(n: int) -> np.ndarray:
    if n not in _HANN:
        _HANN[n] = cv2.createHanningWindow((n, n), cv2.CV_32F)
    return _HANN[n]


_POLAR: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _polar_maps(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``cv2.remap`` coordinates of the polar grid (``ANGLES`` directions over [−90°, 90°), radii
    ``R_LO`` … ``R_HI·n/2``) in a half spectrum ``[n x n/2 + 1]`` whose rows are fft-shifted."""
    if n not in _POLAR:
        th = np.deg2rad(np.arange(ANGLES) * 180.0 / ANGLES - 90.0)[:, None]
        r = np.arange(R_LO, int(R_HI * n / 2), dtype=np.float64)[None, :]
        _POLAR[n] = ((r * np.cos(th)).astype(np.float32), (r * np.sin(th) + n / 2).astype(np.float32))
    return _POLAR[n]


def polar_spectrum(g: np.ndarray) -> np.ndarray:
    """``gray [n x n]`` → ring-centred polar log-magnitude spectrum ``[ANGLES x R]`` float32 over
    the directions [−90°, 90°) (the spectrum of a real image is point-symmetric: the other half
    repeats it; a real FFT gives just this half)."""
    import scipy.fft
    n = g.shape[0]
    spec = np.log1p(np.abs(np.fft.fftshift(scipy.fft.rfft2(g * _hann(n), workers=1), axes=0)))
    polar = cv2.remap(spec.astype(np.float32), *_polar_maps(n), cv2.INTER_LINEAR)
    return polar - polar.mean(0, keepdims=True)


def polar_reference(p_ref: np.ndarray) -> np.ndarray:
    """The reference's polar spectrum prepared for :func:`rotation_mod180` (FFT along the angle
    axis, conjugated)."""
    return np.conj(np.fft.rfft(p_ref, axis=0))


def rotation_mod180(p: np.ndarray, P_ref: np.ndarray) -> tuple[float, float]:
    """Angle (degrees, counter-clockwise, in [0, 180)) by which the image of polar spectrum ``p``
    is rotated relative to the reference (``P_ref`` from :func:`polar_reference`), and the
    correlation peak's sharpness (peak over the correlation's spread)."""
    # Σ_r circular xcorr of each ring = one inverse FFT of the ring-summed cross spectrum
    c = np.fft.irfft((np.fft.rfft(p, axis=0) * P_ref).sum(1), n=ANGLES)
    k = int(np.argmax(c))
    a, b, d = c[k - 1], c[k], c[(k + 1) % ANGLES]
    den = a - 2 * b + d
    off = 0.5 * (a - d) / den if den < 0 else 0.0
    sharp = float((b - c.mean()) / (c.std() + 1e-12))
    # the grid's angle runs clockwise on screen (rows = y down); cv2's rotation counter-clockwise
    return float((-(k + off) * 180.0 / ANGLES) % 180.0), sharp


def rotation_matrix(angle: float, size: int, shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """2×3 affine: rotate by ``-angle`` (undoing a counter-clockwise ``angle``) about the centre of a
    ``size × size`` image, then translate by ``shift`` (pixels)."""
    c = (size - 1) / 2
    M = cv2.getRotationMatrix2D((c, c), -angle, 1.0)
    M[:, 2] += shift
    return M


@dataclass
class Pose:
    """How an image lies relative to the reference: rotated counter-clockwise by ``angle`` degrees
    and shifted by ``(dx, dy)`` pixels at the registration resolution; ``sharpness`` of the
    rotation estimate, ``response`` of the phase correlation."""
    angle: float
    dx: float
    dy: float
    sharpness: float
    response: float

    def matrix(self, size: int, n: int = N) -> np.ndarray:
        """The 2×3 affine that brings a ``size × size`` image to the reference pose."""
        s = size / n
        return rotation_matrix(self.angle, size, (-self.dx * s, -self.dy * s))


def _warp(img: np.ndarray, M: np.ndarray, size: int, border=cv2.BORDER_REFLECT_101, flags=cv2.INTER_LINEAR):
    return cv2.warpAffine(img, M, (size, size), flags=flags, borderMode=border)


_RAMP: dict[int, np.ndarray] = {}


def _reversal_ramp(n: int) -> np.ndarray:
    """``X'(v, u) = conj(X(v, u)) · ramp`` is the half spectrum of the image reversed in both axes
    (its 180° rotation about the centre (n − 1)/2), for a real image and a symmetric window."""
    if n not in _RAMP:
        v, u = np.arange(n)[:, None], np.arange(n // 2 + 1)[None, :]
        _RAMP[n] = np.exp(2j * np.pi * (u + v) / n).astype(np.complex64)
    return _RAMP[n]


def _phase_peak(R: np.ndarray, n: int) -> tuple[float, float, float]:
    """Normalised cross power spectrum (half) → (dx, dy, response) of its correlation peak."""
    import scipy.fft
    R = R / (np.abs(R) + 1e-9)
    r = scipy.fft.irfft2(R, s=(n, n), workers=1)
    k = int(np.argmax(r))
    y, xk = divmod(k, n)
    sub = []
    for line, i in ((r[y, :], xk), (r[:, xk], y)):
        a, b, d = line[i - 1], line[i], line[(i + 1) % n]
        den = a - 2 * b + d
        sub.append(i + (0.5 * (a - d) / den if den < 0 else 0.0))
    dx, dy = ((v + n / 2) % n - n / 2 for v in sub)
    return float(dx), float(dy), float(r[y, xk])


def _spectrum(x: np.ndarray) -> np.ndarray:
    import scipy.fft
    return scipy.fft.rfft2(x * _hann(x.shape[0]), workers=1)


def _phase_shift(F_ref: np.ndarray, x: np.ndarray) -> tuple[float, float, float]:
    """Phase correlation of ``x`` with the reference (``F_ref`` from :func:`reference_spectrum`):
    ``(dx, dy, response)``, ``x`` ≈ the reference shifted by (dx, dy)."""
    return _phase_peak(_spectrum(x) * F_ref, x.shape[0])


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation of two Hann-windowed greys (``[n x n]``, mean 0)."""
    h = _hann(a.shape[0])
    a, b = a * h, b * h
    return float((a * b).sum() / math.sqrt(float((a * a).sum() * (b * b).sum()) + 1e-12))


def register(g: np.ndarray, ref: np.ndarray, P_ref: np.ndarray | None = None,
             F_ref: np.ndarray | None = None, translate: bool = False) -> Pose:
    """Pose of ``gray`` ``g`` relative to ``ref`` (both ``[n x n]`` from :func:`gray`);
    ``P_ref`` / ``F_ref``: the reference's :func:`polar_reference` / :func:`reference_spectrum`.
    ``translate=False``: the pose is a rotation about the centre (``dx = dy = 0``)."""
    n = g.shape[0]
    P_ref = polar_reference(polar_spectrum(ref)) if P_ref is None else P_ref
    F_ref = reference_spectrum(ref) if F_ref is None else F_ref
    angle, sharp = rotation_mod180(polar_spectrum(g), P_ref)
    X = _spectrum(_warp(g, rotation_matrix(angle, n), n))
    best = None
    # the 180° candidate is the same image reversed: its spectrum without another FFT
    for cand, Xc in ((angle, X), (angle + 180.0, np.conj(X) * _reversal_ramp(n))):
        dx, dy, resp = _phase_peak(Xc * F_ref, n)
        if best is None or resp > best.response:
            best = Pose(cand % 360.0, dx if translate else 0.0, dy if translate else 0.0, sharp, resp)
    return best


def reference_spectrum(ref: np.ndarray) -> np.ndarray:
    """The reference's windowed half spectrum, conjugated, for the phase correlation."""
    return np.conj(_spectrum(ref))


class Canonicalizer:
    """Brings images to the pose of a reference built from training images.

    ``fit(images)``: the reference is the first image; every image is registered to it, the
    registered images are averaged (a sharper, less particular reference), and the poses are
    measured again against that mean. ``pose(image)`` → :class:`Pose`; ``to_canonical`` /
    ``to_original`` warp an image and map back. ``reference`` (``[n x n]`` float32) is all there
    is to save."""

    def __init__(self, reference: np.ndarray | None = None, translate: bool = False):
        self.translate = bool(translate)
        self.reference = None if reference is None else np.asarray(reference, np.float32)
        self._p_ref = self._F_ref = None
        if reference is not None:
            self._set_reference(self.reference)

    def _set_reference(self, ref: np.ndarray) -> None:
        self.reference = np.asarray(ref - ref.mean(), np.float32)
        self._p_ref = polar_reference(polar_spectrum(self.reference))
        self._F_ref = reference_spectrum(self.reference)

    def fit(self, images: Sequence[np.ndarray]) -> list[Pose]:
        grays = [gray(im) for im in images]
        self._set_reference(grays[0])
        poses = [self._register(g) for g in grays]
        self._set_reference(np.mean([_warp(g, pz.matrix(N), N) for g, pz in zip(grays, poses)], 0))
        return [self._register(g) for g in grays]

    def _register(self, g: np.ndarray) -> Pose:
        return register(g, self.reference, self._p_ref, self._F_ref, self.translate)

    def pose(self, image: np.ndarray) -> Pose:
        if self.reference is None:
            raise RuntimeError("Canonicalizer is not fitted")
        return self._register(gray(image))

    @staticmethod
    def to_canonical(image: np.ndarray, M: np.ndarray) -> np.ndarray:
        return _warp(image, M, image.shape[0])

    @staticmethod
    def to_original(amap: np.ndarray, M: np.ndarray) -> np.ndarray:
        """A canonical-frame map back to the image's own frame (pixels the canonical frame does
        not cover take the nearest covered value)."""
        return _warp(amap, cv2.invertAffineTransform(M), amap.shape[0], border=cv2.BORDER_REPLICATE)


def rotation_gain(images: Sequence[np.ndarray], canon: "Canonicalizer", poses: Sequence[Pose]) -> float:
    """How much turning the training images helps them match the reference: the median over
    ``images`` of NCC(turned by its pose's angle, then shifted by phase correlation) −
    NCC(shifted only), on the Hann-windowed greys. ≈ 0 for aligned products (their measured
    angles are a few degrees of noise: MVTec transistor, the demo bottle and brushed metal give
    ≤ 0.02); parts lying at any angle gain a lot (transistor rotated at random: ≈ 1; a texture
    rotated at random, brushed metal: ≈ 0.2). :data:`GAIN_MIN` is ``auto``'s threshold."""
    ref, F_ref, gains = canon.reference, canon._F_ref, []
    for im, pz in zip(images, poses):
        g = gray(im)
        matched = []
        for x in (g, _warp(g, rotation_matrix(pz.angle, N), N)):
            dx, dy, _ = _phase_shift(F_ref, x)
            matched.append(ncc(_warp(x, Pose(0.0, dx, dy, 0, 0).matrix(N), N), ref))
        gains.append(matched[1] - matched[0])
    return float(np.median(gains)) if gains else 0.0


def augment_views(image: np.ndarray, n_angles: int = 8, flip: bool = False) -> list[np.ndarray]:
    """``image [S x S x 3]`` rotated by ``k·360/n_angles`` degrees (k = 0 … n_angles − 1; corners
    filled by reflection) and, with ``flip``, the same for its mirror image: the bank's views
    for ``orient="augment"`` (the first view is the image itself)."""
    size = image.shape[0]
    views = []
    for im in ([image, np.ascontiguousarray(image[:, ::-1])] if flip else [image]):
        for k in range(n_angles):
            a = 360.0 * k / n_angles
            if k == 0:
                views.append(im)
            elif a % 90 == 0:
                views.append(np.ascontiguousarray(np.rot90(im, int(a // 90))))
            else:
                views.append(_warp(im, rotation_matrix(-a, size), size))
    return views


__all__ = ["Canonicalizer", "Pose", "register", "gray", "polar_spectrum", "rotation_mod180",
           "rotation_matrix", "rotation_gain", "augment_views", "ORIENT_MODES", "ncc", "reference_spectrum", "polar_reference"]
