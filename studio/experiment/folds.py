"""Cross-fitting: which real defects are reference and which are scored in each fold.

With ``K`` folds the experiment (not the product: its roles are untouched) splits every damage
type's real defects into ``K`` groups by a hash of their pixels (the same rule as the roles:
rank by ``sha256(type | pixel hash)``, fold = rank mod K; pixel-identical copies share a fold).
In fold ``f`` the defects of group ``f`` are scored and the others are the reference defects
that anything learning from real defects may use; so every real defect is scored once, by models
that learned nothing from it in that fold. ``K = 1`` is the product's own roles (a fixed split:
only the evaluation defects are scored).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

from pipelines import roles as R

DEFAULT_FOLDS = 3


@dataclass
class Fold:
    """One fold: indices into the experiment's list of real defects."""
    index: int
    reference: list[int]
    evaluation: list[int]


def default_folds(defects: Sequence, hashes: dict) -> int:
    """:data:`DEFAULT_FOLDS` when every damage type has at least that many distinct real defects,
    else 1 (the product's roles)."""
    by_type: dict[str, set[str]] = {}
    for s in defects:
        by_type.setdefault(s.label, set()).add(hashes[s.path])
    return DEFAULT_FOLDS if by_type and min(len(v) for v in by_type.values()) >= DEFAULT_FOLDS else 1


def make_folds(defects: Sequence, hashes: dict, k: int, roles: R.CategoryRoles | None = None) -> list[Fold]:
    """``defects``: every real defect (``TestSample``) in a fixed order; ``hashes``: path → pixel
    hash. ``k == 1``: one fold from ``roles`` (reference / evaluation as the product says)."""
    if k == 1:
        if roles is None:
            raise ValueError("one fold means the product's roles: pass them")
        ev = {s.path for s in roles.evaluation}
        return [Fold(0, [i for i, s in enumerate(defects) if s.path not in ev],
                     [i for i, s in enumerate(defects) if s.path in ev])]
    group: dict[str, int] = {}
    by_type: dict[str, set[str]] = {}
    for s in defects:
        by_type.setdefault(s.label, set()).add(hashes[s.path])
    for label, shas in sorted(by_type.items()):
        ranked = sorted(shas, key=lambda h: hashlib.sha256(f"{label}|{h}".encode()).hexdigest())
        for r, h in enumerate(ranked):
            group.setdefault(h, r % k)          # a hash in two types keeps its first group
    folds = []
    for f in range(k):
        ev = [i for i, s in enumerate(defects) if group[hashes[s.path]] == f]
        ref = [i for i, s in enumerate(defects) if group[hashes[s.path]] != f]
        folds.append(Fold(f, ref, ev))
    return folds


__all__ = ["DEFAULT_FOLDS", "Fold", "default_folds", "make_folds"]
