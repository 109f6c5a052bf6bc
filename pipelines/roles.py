"""Data roles of real defect images: ``reference`` (may be learned from / copied) or
``evaluation`` (only ever scored).

Every real defect image of a product has exactly one role:

* ``reference`` — anything that learns from or copies real defects may use it: cut-paste donors,
  LoRA / pixel-inpaint training data, the positive bank's real crops, the segmenter's real arm,
  mask-shape statistics.
* ``evaluation`` — only ever scored. Nothing that learns from or copies defects may see it.

Good images (``train/good``, ``test/good``) have no role: nothing copies a defect from them, and
``test/good`` is always scored.

The assignment is deterministic and depends only on the pixels, never on file names or order:
per damage type, images are ranked by their pixel hash (:func:`pixel_hash`, the same hash the
dataset store keeps in ``images.sha256``) and the first ``k = floor(fraction · n + 0.5)`` are
``reference``, clamped to ``1 ≤ k ≤ n − 1`` (a type with one image keeps it for evaluation).
Importing the same data again therefore gives the same roles, and a category folder given to a
CLI command gets the same split as the store after importing that folder. A folder may carry an
``evaluation.txt`` (written by every export: one path per line, relative to the folder); when it
does, it decides, so roles edited in the Dataset tab survive an export.

The reference share is fixed (:data:`DEFAULT_REFERENCE_FRACTION`, 0.4): no command, tab or request
changes the split; roles change only through ``python -m studio roles --set`` / the Dataset tab
(which mark runs that scored a now-reference image stale, see :mod:`studio.runs`).

Every consumer reads roles through :func:`category_roles` (folders) or the store's
``images.role`` column, :func:`check_descent` refuses synthetic samples that descend from an
evaluation image, and :func:`pipelines.guard.guard` refuses any array about to be learned from
that equals (or nearly equals) a scored image.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

REFERENCE = "reference"
EVALUATION = "evaluation"
ROLES = (REFERENCE, EVALUATION)
DEFAULT_REFERENCE_FRACTION = 0.4
EVALUATION_FILE = "evaluation.txt"


class LeakageError(ValueError):
    """A synthetic sample (or a training set) descends from an evaluation image."""


def pixel_hash(arr: np.ndarray) -> str:
    """SHA-256 of decoded pixels (shape, dtype and bytes): PNG and lossless re-encodes of the same
    pixels hash alike. Identical to the dataset store's ``images.sha256``."""
    h = hashlib.sha256(f"{arr.shape}|{arr.dtype}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def file_pixel_hash(path: str | Path) -> str:
    """:func:`pixel_hash` of an image file decoded to RGB uint8 (as the store decodes it)."""
    from pipelines.imageio import read_rgb
    return pixel_hash(read_rgb(Path(path)))


def reference_count(n: int, fraction: float) -> int:
    """How many of ``n`` defects of one type are ``reference``."""
    if not 0 < fraction < 1:
        raise ValueError(f"reference fraction must be in (0, 1), got {fraction}")
    if n < 2:
        return 0
    return min(max(1, math.floor(fraction * n + 0.5)), n - 1)


def assign_roles(items: Iterable[tuple[str, str]], fraction: float = DEFAULT_REFERENCE_FRACTION
                 ) -> dict[str, str]:
    """``items``: ``(damage_type, pixel_hash)`` of real defect images → ``{pixel_hash: role}``.

    Per type the images are ranked by hash; the first :func:`reference_count` are reference.
    Duplicated pixels (one hash twice) get one role."""
    by_type: dict[str, set[str]] = {}
    for label, sha in items:
        by_type.setdefault(label, set()).add(sha)
    roles: dict[str, str] = {}
    for label in sorted(by_type):
        ranked = sorted(by_type[label], key=lambda s: hashlib.sha256(f"{label}|{s}".encode()).hexdigest())
        k = reference_count(len(ranked), fraction)
        for i, sha in enumerate(ranked):
            role = REFERENCE if i < k else EVALUATION
            # a hash seen in two types: evaluation wins (never learn from a scored image)
            roles[sha] = EVALUATION if roles.get(sha) == EVALUATION else role
    return roles


@dataclass
class CategoryRoles:
    """Roles of one MVTec-layout category folder (paths are the category's own ``TestSample`` s)."""
    root: Path
    reference: list          # TestSample: real defects that may be learned from / copied
    evaluation: list         # TestSample: defects that are only scored (+ nothing else)
    good: list               # TestSample: test/good (always scored)
    hashes: dict = field(default_factory=dict)   # Path -> pixel hash, every test image
    source: str = "rule"     # "rule" (the fixed fraction) or "evaluation.txt"
    fraction: float = DEFAULT_REFERENCE_FRACTION

    @property
    def scored(self) -> list:
        """What evaluation scores: evaluation defects + test/good, in the category's order."""
        keep = {s.path for s in self.evaluation} | {s.path for s in self.good}
        return [s for s in self._order if s.path in keep]

    @property
    def evaluation_hashes(self) -> set[str]:
        return {self.hashes[s.path] for s in self.evaluation}

    @property
    def reference_hashes(self) -> set[str]:
        return {self.hashes[s.path] for s in self.reference}

    def rel(self, samples: Sequence) -> list[str]:
        return [str(s.path.relative_to(self.root)) for s in samples]

    _order: list = field(default_factory=list, repr=False)


def read_evaluation_file(root: Path) -> set[str] | None:
    f = Path(root) / EVALUATION_FILE
    if not f.is_file():
        return None
    lines = [ln.strip() for ln in f.read_text(encoding="utf-8").splitlines()]
    return {ln for ln in lines if ln and not ln.startswith("#")}


def category_roles(category) -> CategoryRoles:
    """Roles of a loaded :class:`pipelines.mvtec.Category` — the one function every consumer of a
    folder uses (PatchCore's positive bank, trainers, cut-paste donors, the experiment). There is no
    knob: the split is the folder's ``evaluation.txt`` or the fixed rule
    (:data:`DEFAULT_REFERENCE_FRACTION`); roles change only through ``roles --set`` / the Dataset
    tab, and the images a consumer then learns from pass :func:`pipelines.guard.guard`."""
    fraction = DEFAULT_REFERENCE_FRACTION
    root = Path(category.root)
    hashes = {s.path: file_pixel_hash(s.path) for s in category.test if s.is_anomaly}
    listed = read_evaluation_file(root)
    defects = [s for s in category.test if s.is_anomaly]
    if listed is not None:
        evaluation = [s for s in defects if str(s.path.relative_to(root)) in listed]
        source = EVALUATION_FILE
    else:
        roles = assign_roles(((s.label, hashes[s.path]) for s in defects), fraction)
        evaluation = [s for s in defects if roles[hashes[s.path]] == EVALUATION]
        source = "rule"
    ev = {s.path for s in evaluation}
    # pixel-identical copies: if one copy is evaluated, no copy may be reference
    ev_hashes = {hashes[p] for p in ev}
    reference = [s for s in defects if s.path not in ev and hashes[s.path] not in ev_hashes]
    evaluation = [s for s in defects if s.path in ev or hashes[s.path] in ev_hashes]
    good = [s for s in category.test if not s.is_anomaly]
    return CategoryRoles(root, reference, evaluation, good, hashes, source, fraction, list(category.test))


def folder_roles(root: str | Path) -> CategoryRoles:
    from pipelines.mvtec import load_category
    return category_roles(load_category(root, require_masks=True, require_test=False))


def check_descent(samples: Iterable[tuple[str, Iterable[str]]], evaluation_hashes: set[str]) -> None:
    """``samples``: ``(name, hashes of the real images it descends from)``. Raises
    :class:`LeakageError` naming every sample that descends from an evaluation image."""
    bad = []
    for name, ancestors in samples:
        hit = sorted(set(ancestors) & evaluation_hashes)
        if hit:
            bad.append(f"{name} (from evaluation image {hit[0][:12]}…)")
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise LeakageError(
            f"{len(bad)} synthetic sample(s) descend from real images that are evaluated: "
            f"{'; '.join(bad[:5])}{more}. Regenerate them from reference defects only (or change "
            "the images' role to 'reference' in the Dataset tab, which takes them out of evaluation)")


__all__ = ["REFERENCE", "EVALUATION", "ROLES", "DEFAULT_REFERENCE_FRACTION", "EVALUATION_FILE",
           "LeakageError", "pixel_hash", "file_pixel_hash", "reference_count", "assign_roles",
           "CategoryRoles", "category_roles", "folder_roles", "check_descent", "read_evaluation_file"]
