"""Defects to train on: :class:`Sample`, :func:`training_data` (reference defects + an export's
accepted synthetic ones, guarded against the scored images), :func:`load_training_samples` (the
data of a config, with its provenance written), :func:`good_images`, :func:`check_samples`."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from pipelines.training.base import ConfigError, TrainDataError

# ================================================================================================
# Samples
# ================================================================================================
class Sample(NamedTuple):
    image: np.ndarray        # H x W x 3 uint8
    mask: np.ndarray         # H x W uint8 {0, 255}
    damage_type: str


def _binary(m: np.ndarray) -> np.ndarray:
    return np.where(m, 255, 0).astype(np.uint8)


class TrainingData(NamedTuple):
    """What a trainer fits, as built: the samples, their names, the pixel hashes of their images
    (:func:`pipelines.guard.guard`, computed from exactly these arrays) and how many of each kind."""
    samples: list            # Sample
    names: list              # str: "test/<type>/NNN.png" (reference) or "<extra>/synthetic/<type>/…"
    fit_hashes: list         # str: pixel hash of each sample's image, in order
    counts: dict             # {"reference": n, "synthetic": m, "evaluation": 0}


def training_data(root: str | Path, damage_types: Sequence[str] | None = None,
                  extra: str | Path | None = None, size: int | None = None,
                  purpose: str = "training data") -> TrainingData:
    """Reference real defects (data role ``reference``, see :mod:`pipelines.roles`) of an
    MVTec-layout category (``test/<type>`` + ``ground_truth/<type>``), plus optionally the accepted
    synthetic ones of an export ``extra`` (only its ``synthetic/<type>`` +
    ``synthetic_ground_truth/<type>``; its ``test/`` is never read). Every image, as built (after
    resizing to ``size``), goes through :func:`pipelines.guard.guard` against the category's scored
    images (evaluation defects + ``test/good``): a copy — exact, re-encoded, resized or locally
    edited — raises :class:`pipelines.roles.LeakageError` naming it. ``damage_types=None`` takes
    every type found. A chosen type with no sample → TrainDataError."""
    from pipelines.guard import ScoredSet, guard
    from pipelines.mvtec import load_category, load_image, load_mask
    from pipelines.roles import category_roles
    cat = load_category(root, require_masks=True, require_test=False)
    roles = category_roles(cat)
    named: list[tuple[str, Sample]] = []
    for s in roles.reference:    # evaluation defects are never trained on
        if damage_types is None or s.label in damage_types:
            named.append((str(Path(s.path).relative_to(roles.root)),
                          Sample(load_image(s.path, size), _binary(load_mask(s, size)), s.label)))
    n_ref = len(named)
    if extra is not None:
        named += _extra_samples(Path(extra), damage_types, size)
    samples = [s for _, s in named]
    check_samples(samples, damage_types, where=str(root))
    hashes = guard(((n, s.image) for n, s in named), ScoredSet.from_roles(roles), purpose)
    return TrainingData(samples, [n for n, _ in named], hashes,
                        {"reference": n_ref, "synthetic": len(named) - n_ref, "evaluation": 0})


def samples_from_category(root: str | Path, damage_types: Sequence[str] | None = None,
                          extra: str | Path | None = None, size: int | None = None) -> list[Sample]:
    """The samples of :func:`training_data` (reference defects + ``extra``'s accepted synthetic
    ones, guarded against the category's scored images)."""
    return training_data(root, damage_types, extra, size).samples


def load_training_samples(cfg) -> list[Sample]:
    """``run_from_config``'s data: the samples of ``cfg.data`` (+ ``cfg.extra_data``) for
    ``cfg.damage_types`` at ``cfg.image_size``, after writing their provenance
    (``OUT/training_data.json``, :mod:`pipelines.training_data`: the hashes of exactly the arrays
    returned, ``fit_hashes``, and the counts; a leak of evaluation data raises)."""
    if not cfg.data:
        raise ConfigError("data (an MVTec-layout category folder) is required")
    from pipelines.training_data import training_manifest, write_manifest
    kind = getattr(type(cfg), "what", "") or type(cfg).__name__       # RunConfig.what: "LoRA", …
    data = training_data(cfg.data, cfg.damage_types, cfg.extra_data, cfg.image_size,
                         purpose=f"{kind} training data")          # the guard: names each copied file
    manifest = training_manifest(cfg.data, cfg.damage_types, cfg.extra_data)   # + provenance descent
    manifest.update(fit_hashes=data.fit_hashes, fit_files=data.names, counts=data.counts)
    write_manifest(cfg.output_dir, manifest)
    return data.samples


def good_images(root: str | Path, size: int | None, purpose: str = "good training images"
                ) -> tuple[list[np.ndarray], list[str]]:
    """The category's ``train/good`` images at ``size`` (for trainers that also learn defect-free
    texture), guarded like the defects (a copy of a scored image — ``test/good`` or an evaluation
    defect — placed in ``train/good`` is refused). Returns ``(images, their pixel hashes)``."""
    from pipelines.guard import ScoredSet, guard
    from pipelines.mvtec import load_category, load_image
    from pipelines.roles import category_roles
    cat = load_category(root, require_masks=True, require_test=False)
    images = [load_image(p, size) for p in cat.train]
    names = [str(Path(p).relative_to(cat.root)) for p in cat.train]
    return images, guard(zip(names, images), ScoredSet.from_roles(category_roles(cat)), purpose)


def _extra_samples(extra: Path, damage_types: Sequence[str] | None, size: int | None
                   ) -> list[tuple[str, Sample]]:
    """Accepted synthetic samples of an export: ``synthetic/<type>/*`` (every supported image
    extension) with ``synthetic_ground_truth/<type>/<stem>_mask.png``. Nothing else of the folder
    is read (its ``test/`` holds the product's real images, evaluation ones included)."""
    from pipelines.mvtec import LayoutError, export_samples
    if not extra.is_dir():
        raise TrainDataError(f"the extra sample folder {extra} does not exist")
    try:
        found = export_samples(extra, size, damage_types, missing="; the real reference defects of --data "
                                                                  "are already trained on")
    except LayoutError as exc:
        raise TrainDataError(str(exc)) from None
    return [(name, Sample(img, _binary(m), t)) for name, t, img, m in found]


def check_samples(samples: Sequence, damage_types: Sequence[str] | None, where: str = "the dataset"
                  ) -> list[str]:
    """The damage types to train (sorted, unique); a chosen type with no samples, an empty mask
    or a size mismatch → :class:`TrainDataError`."""
    have: dict[str, int] = {}
    for i, s in enumerate(samples):
        img, m, t = s
        if np.asarray(img).shape[:2] != np.asarray(m).shape[:2]:
            raise TrainDataError(f"sample {i} ({t}): image {np.asarray(img).shape[:2]} and mask "
                                 f"{np.asarray(m).shape[:2]} differ in size")
        if not np.asarray(m).any():
            raise TrainDataError(f"sample {i} ({t}) has an empty mask")
        have[t] = have.get(t, 0) + 1
    if damage_types is None:
        if not have:
            raise TrainDataError(f"{where} holds no defect samples with masks to train on")
        return sorted(have)
    missing = [t for t in damage_types if not have.get(t)]
    if missing:
        found = ", ".join(f"{k} ({v})" for k, v in sorted(have.items())) or "none"
        raise TrainDataError(f"no defect samples of type {', '.join(map(repr, missing))} in {where}; "
                             f"types with samples: {found}")
    return sorted(dict.fromkeys(damage_types))


