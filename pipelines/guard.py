"""The one guard where learning happens: nothing learns from, or copies, an image it is scored on.

Everything that learns from or copies real defects — cut-paste / defect-transfer donors, the
shape model, the pixel-inpaint / LoRA / ControlNet / wall trainers (``extra_data`` included),
PatchCore's positive bank, the segmenter, anything that picks a threshold or a default — passes
the decoded arrays it is about to fit through :func:`guard`, against the :class:`ScoredSet` of the
product (its evaluation defects + ``test/good``). :func:`guard` refuses, naming the item and the
scored image it equals, any array that is

* **pixel-identical** to a scored image (:func:`pipelines.roles.pixel_hash` of the decoded pixels:
  a PNG, a BMP, a TIFF or a lossless WebP copy hash alike, whatever the extension), or
* a **near-duplicate** of one: a re-encoded (JPEG), resized or locally edited copy.

Near-duplicate fingerprint and distance (:func:`fingerprint`, :func:`distances`): the image in grey,
``INTER_AREA``-resized to 32 × 32, float, not normalised; the distance of two fingerprints is the
mean of the smallest 80 % of the 1024 absolute cell differences (grey levels, 0–255). Trimming the
largest 20 % makes a copy with a *local* change (a synthetic defect painted on an evaluation
image) as close as an unchanged copy, while two different photos of the product still differ in
most cells. A pHash (64 bits) was too coarse: every transistor photo looks alike at that level.

Measured (``python benchmarks/guard_threshold.py DATA…``) on the real MVTec AD transistor subset
(71 images: train/good, test/good, 19 defects) and the demo sets bottle and brushed_metal (53 each):

===============================================  ===========  ========  =============
distance                                          transistor   bottle    brushed_metal
===============================================  ===========  ========  =============
to the nearest OTHER image (min / 5th pct / med)  2.75/2.96/3.96  2.49/2.59/2.96  2.73/2.93/3.51
JPEG q=90 re-encode (max)                         0.08         0.09      0.08
0.5× resize (max)                                 0.11         0.10      0.11
resize to 128 / 2× upscale (max)                  0.11 / 0.03  0.10 / 0.01  0.11 / 0.02
0.5× resize then JPEG q=90 (max)                  0.17         0.18      0.16
10 % of the area painted (noise patch / flat)     0.00 / 0.00  0.00 / 0.00  0.00 / 0.00
20 % of the area painted (noise patch / flat)     0.34 / 0.35  0.29 / 0.22  1.06 / 0.45
===============================================  ===========  ========  =============

:data:`NEAR_DUPLICATE_THRESHOLD` = 1.0: 5.5× the largest copy distance (0.18), and the closest
genuinely different image (2.49) is 2.5× above it. A 10 % local edit is refused with the same
margin; a 20 % edit is at the edge (up to 1.06 on brushed_metal: some pass) and larger edits pass. Not covered:
crops of a scored image, global brightness / contrast / colour changes (the distance grows with
the shift), flips and rotations. Untrimmed mean-abs distances could not separate a 10 % edit
(up to 8.7) from a different photo (down to 4.0), hence the trimmed mean.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from pipelines.imageio import IMAGE_SUFFIXES, ImageInputError, read_rgb
from pipelines.roles import LeakageError, pixel_hash

SUPPORTED_EXTENSIONS: tuple[str, ...] = tuple(IMAGE_SUFFIXES)
NEAR_DUPLICATE_THRESHOLD: float = 1.0
FINGERPRINT_SIZE = 32
KEEP_FRACTION = 0.8          # the distance averages the smallest 80 % of cell differences
_KEEP = int(round(KEEP_FRACTION * FINGERPRINT_SIZE * FINGERPRINT_SIZE))


def _rgb(arr: np.ndarray) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an H×W×3 image, got an array of shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.dtype != np.uint8:
        f = a.astype(np.float32)
        a = np.clip(f * (255 if f.size and f.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a[..., :3])


def fingerprint(arr: np.ndarray) -> np.ndarray:
    """Size-independent fingerprint: grey, INTER_AREA to 32 × 32, float32 grey levels."""
    grey = cv2.cvtColor(_rgb(arr), cv2.COLOR_RGB2GRAY).astype(np.float32)
    return cv2.resize(grey, (FINGERPRINT_SIZE, FINGERPRINT_SIZE), interpolation=cv2.INTER_AREA)


def distances(fp: np.ndarray, fps: np.ndarray) -> np.ndarray:
    """Distance of one fingerprint to each of ``fps`` (N × 32 × 32): mean of the smallest 80 % of
    the absolute cell differences."""
    if len(fps) == 0:
        return np.zeros(0, np.float32)
    d = np.abs(fps.reshape(len(fps), -1) - fp.reshape(1, -1))
    return np.partition(d, _KEEP - 1, axis=1)[:, :_KEEP].mean(axis=1)


class ScoredSet:
    """Fingerprints of the images an evaluation scores (evaluation defects + test/good)."""

    def __init__(self, names: Sequence[str], hashes: Sequence[str], fingerprints: np.ndarray):
        self.names = list(names)
        self.hashes = list(hashes)
        self._by_hash: dict[str, str] = {}
        for n, h in zip(self.names, self.hashes):
            self._by_hash.setdefault(h, n)
        self._fps = (np.asarray(fingerprints, np.float32).reshape(-1, FINGERPRINT_SIZE, FINGERPRINT_SIZE)
                     if len(self.names) else np.zeros((0, FINGERPRINT_SIZE, FINGERPRINT_SIZE), np.float32))

    @classmethod
    def from_images(cls, named: Iterable[tuple[str, np.ndarray]]) -> "ScoredSet":
        names, hashes, fps = [], [], []
        for name, arr in named:
            a = _rgb(arr)
            names.append(str(name))
            hashes.append(pixel_hash(a))
            fps.append(fingerprint(a))
        return cls(names, hashes, np.stack(fps) if fps else np.zeros((0,)))

    @classmethod
    def from_roles(cls, roles) -> "ScoredSet":
        """Decodes ``roles.evaluation`` + ``roles.good`` (names: paths relative to ``roles.root``)."""
        root = Path(roles.root)
        paths = [Path(s.path) for s in list(roles.evaluation) + list(roles.good)]
        return cls._from_paths(tuple(paths), root)

    @classmethod
    def from_files(cls, paths: Iterable[str | Path], root: str | Path | None = None) -> "ScoredSet":
        """Decodes image files (names: relative to ``root`` when given)."""
        return cls._from_paths(tuple(Path(p) for p in paths), Path(root) if root else None)

    @classmethod
    def _from_paths(cls, paths: tuple[Path, ...], root: Path | None) -> "ScoredSet":
        names, hashes, fps = [], [], []
        for p in paths:
            h, fp = _file_fingerprint(p)
            try:
                names.append(str(p.relative_to(root)) if root else str(p))
            except ValueError:
                names.append(str(p))
            hashes.append(h)
            fps.append(fp)
        return cls(names, hashes, np.stack(fps) if fps else np.zeros((0,)))

    def match(self, arr: np.ndarray) -> tuple[str, str] | None:
        """``(scored image name, how)`` for the scored image ``arr`` equals, or None.
        ``how``: ``"pixel-identical"`` or ``"near-duplicate (distance 0.08 ≤ 1.0)"``."""
        if not self.names:
            return None
        a = _rgb(arr)
        hit = self._by_hash.get(pixel_hash(a))
        if hit is not None:
            return hit, "pixel-identical"
        d = distances(fingerprint(a), self._fps)
        i = int(np.argmin(d))
        if d[i] <= NEAR_DUPLICATE_THRESHOLD:
            return self.names[i], f"near-duplicate (distance {d[i]:.2f} ≤ {NEAR_DUPLICATE_THRESHOLD})"
        return None

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"ScoredSet({len(self)} scored images)"


_FILE_CACHE: dict[tuple, tuple[str, np.ndarray]] = {}
_FILE_CACHE_MAX = 20_000


def _file_fingerprint(path: Path) -> tuple[str, np.ndarray]:
    """(pixel hash, fingerprint) of an image file, cached by (path, size, mtime)."""
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if key is not None and key in _FILE_CACHE:
        return _FILE_CACHE[key]
    arr = _decode(path)
    out = (pixel_hash(arr), fingerprint(arr))
    if key is not None:
        if len(_FILE_CACHE) >= _FILE_CACHE_MAX:
            _FILE_CACHE.clear()
        _FILE_CACHE[key] = out
    return out


def _decode(path: Path) -> np.ndarray:
    try:
        return read_rgb(path)
    except ImageInputError as exc:
        raise ImageInputError(f"cannot decode {path}: {exc}") from exc


def guard(items: Iterable[tuple[str, np.ndarray]], scored: ScoredSet, purpose: str) -> list[str]:
    """Check every array about to be learned from / copied. Returns the pixel hashes
    (:func:`pipelines.roles.pixel_hash`) of the arrays exactly as given, in order. Raises
    :class:`pipelines.roles.LeakageError` naming every offending item (first 5 + count)."""
    hashes, bad = [], []
    for name, arr in items:
        hashes.append(pixel_hash(np.asarray(arr)))
        hit = scored.match(arr)
        if hit is not None:
            bad.append(f"{name} equals the evaluation image {hit[0]} ({hit[1]})")
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise LeakageError(
            f"{purpose}: {'; '.join(bad[:5])}{more} — {len(bad)} of {len(hashes)} image(s) are images "
            "the evaluation scores. Remove them from what is learned from, or, if they should be "
            "learned from, make them reference (python -m studio roles --set … / the Dataset tab), "
            "which takes them out of evaluation")
    return hashes


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Every file of a :data:`SUPPORTED_EXTENSIONS` extension in ``folder`` (sorted)."""
    folder = Path(folder)
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS)


def read_images(paths_or_folder, *, recursive: bool = False) -> list[tuple[Path, np.ndarray]]:
    """Decodes every :data:`SUPPORTED_EXTENSIONS` file of a folder (sorted; ``recursive`` for
    sub-folders) or of a list of paths, as RGB uint8. An undecodable file raises
    :class:`pipelines.imageio.ImageInputError` naming it."""
    if isinstance(paths_or_folder, (str, Path)) and Path(paths_or_folder).is_dir():
        paths = list_images(paths_or_folder, recursive)
    elif isinstance(paths_or_folder, (str, Path)):
        raise ImageInputError(f"{paths_or_folder} is not a folder")
    else:
        paths = [Path(p) for p in paths_or_folder]
    return [(p, _decode(p)) for p in paths]


__all__ = ["SUPPORTED_EXTENSIONS", "NEAR_DUPLICATE_THRESHOLD", "ScoredSet", "guard", "read_images",
           "list_images", "fingerprint", "distances", "LeakageError"]
