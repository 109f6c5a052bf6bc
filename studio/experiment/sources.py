"""Sources of synthetic defects: an export of accepted samples (checked where it is read), and
the mask shapes the protocol generates on (fitted on reference masks only)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from pipelines import roles as R

@dataclass
class Synthetic:
    """One synthetic defect: image ``[S x S x 3]`` uint8, mask ``[S x S]`` bool, and where it came from."""
    image: np.ndarray
    mask: np.ndarray
    label: str
    name: str                                # file (export) or generator/repeat/type/index
    sha: str                                 # pixel hash of the image
    ancestors: list[str] = field(default_factory=list)   # hashes of the real images it derives from


# ------------------------------------------------------------------------------------------------
# Mask shapes: the studio's shape model (pipelines.shapes), fitted on reference masks only


PLACEMENT_TRIES = 6     # masks drawn per sample when placement follows the structure


def structure_share(image: np.ndarray, mask: np.ndarray) -> float:
    """Share of ``mask`` lying on the image's structure (its colour outliers against its own
    background: :func:`pipelines.generators.align.structure_mask`) — leads, wires, printed parts."""
    from pipelines.generators.align import rgb_u8, structure_mask
    m = np.asarray(mask) > 0
    return float((structure_mask(rgb_u8(image)) & m).sum() / max(1, int(m.sum())))


@dataclass
class MaskSampler:
    """Masks shaped like one damage type's *reference* masks, on the product: a
    :func:`pipelines.shapes.shape_model_for` fitted on them (the model the Curation batch uses),
    sampled inside the foreground :func:`pipelines.shapes.estimate_foreground` finds on
    train/good — or without one when the references mostly lie off it (``on_product``).

    Placement follows the structure where the references do: fitted with the reference
    *images*, the sampler records the median share of a reference mask lying on its image's
    structure (:func:`structure_share`: a bent lead's mask lies on the lead, a stain's on the
    surface); given the base image, it draws :data:`PLACEMENT_TRIES` masks and keeps the one
    whose share on that image is closest — a bent-lead mask lands on a lead, not on the board
    beside it."""
    model: object
    foreground: np.ndarray | None
    share: float | None = None

    @classmethod
    def fit(cls, damage_type: str, ref_masks: Sequence[np.ndarray], foreground: np.ndarray | None,
            ref_images: Sequence[np.ndarray] | None = None) -> "MaskSampler":
        from pipelines import shapes
        fg = None if foreground is None or foreground.all() else foreground
        masks = [np.asarray(m) > 0 for m in ref_masks]
        model = shapes.shape_model_for(damage_type, masks, fg)
        share = None
        if ref_images is not None and len(ref_images) == len(masks):
            shares = [structure_share(i, m) for i, m in zip(ref_images, masks) if m.any()]
            share = float(np.median(shares)) if shares else None
        return cls(model, fg if getattr(model, "on_product", True) else None, share)

    def sample(self, shape: tuple[int, int], rng: np.random.Generator, image: np.ndarray | None = None
               ) -> np.ndarray:
        """``[H x W]`` bool, never empty; with ``image`` (and a fitted share) the best-placed of
        :data:`PLACEMENT_TRIES` draws. Deterministic in ``rng`` (and ``image``)."""
        if image is None or self.share is None:
            return self.model.sample(shape, rng, foreground=self.foreground) > 0
        draws = [self.model.sample(shape, rng, foreground=self.foreground) > 0 for _ in range(PLACEMENT_TRIES)]
        gaps = [abs(structure_share(image, m) - self.share) for m in draws]
        return draws[int(np.argmin(gaps))]


# ------------------------------------------------------------------------------------------------
# Sources of synthetic defects


def _hash_list(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str)]
    return []


def _provenance_ancestors(folder: Path) -> dict[str, list[str]]:
    """``provenance.jsonl`` of an export → ``{file (relative): ancestor hashes}`` from the keys
    ``descends_from``, ``source_sha256``, ``donor_sha256`` and ``source_image.sha256``."""
    out: dict[str, list[str]] = {}
    prov = folder / "provenance.jsonl"
    if not prov.is_file():
        return out
    for n, line in enumerate(prov.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{prov} line {n} is not JSON ({exc}); re-export the synthetic set") from None
        anc = (_hash_list(rec.get("descends_from")) + _hash_list(rec.get("source_sha256"))
               + _hash_list(rec.get("donor_sha256")))
        src = rec.get("source_image")
        if isinstance(src, dict):
            anc += _hash_list(src.get("sha256"))
        if rec.get("file"):
            out[str(rec["file"])] = sorted(set(anc))
    return out


def load_export(folder: str | Path, size: int, roles: R.CategoryRoles) -> list[Synthetic]:
    """The accepted synthetic defects of an export (``synthetic/<type>/*`` of any image extension
    the studio decodes, with ``synthetic_ground_truth/<type>/<stem>_mask.png``), checked against
    the images the run scores (``roles``' evaluation defects + test/good): every decoded sample
    passes :func:`pipelines.guard.guard` (pixel-identical or a near-duplicate — re-encoded,
    resized — is refused, naming the file and the scored image), and a sample whose provenance
    names a scored image as an ancestor is refused too (:class:`pipelines.roles.LeakageError`)."""
    from pipelines.guard import SUPPORTED_EXTENSIONS, ScoredSet, guard
    from pipelines.imageio import read_mask
    from pipelines.mvtec import load_image
    folder = Path(folder)
    syn_root = folder / "synthetic"
    files = sorted(p for p in syn_root.glob("*/*") if p.suffix.lower() in SUPPORTED_EXTENSIONS) \
        if syn_root.is_dir() else []
    if not files:
        raise ValueError(f"{folder} holds no accepted synthetic samples (synthetic/<type>/*.png) — accept "
                         "some candidates first, then export")
    ancestry = _provenance_ancestors(folder)
    decoded: list[tuple[str, np.ndarray, np.ndarray, str]] = []
    for f in files:
        rel = str(f.relative_to(folder))
        mask_file = folder / "synthetic_ground_truth" / f.parent.name / f"{f.stem}_mask.png"
        if not mask_file.is_file():
            continue
        m = read_mask(mask_file)
        m = cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST) > 0 if m.shape != (size, size) else m > 0
        if not m.any():
            continue
        img = load_image(f, size)
        decoded.append((rel, img, m, f.parent.name))
    if not decoded:
        raise ValueError(f"{folder} holds no accepted synthetic samples with masks "
                         "(synthetic_ground_truth/<type>/NNN_mask.png)")
    hashes = guard([(rel, img) for rel, img, _, _ in decoded], ScoredSet.from_roles(roles),
                   f"experiment --synthetic {folder}")
    out = [Synthetic(img, m, label, rel, sha, ancestry.get(rel, []))
           for (rel, img, m, label), sha in zip(decoded, hashes)]
    R.check_descent([(s.name, s.ancestors) for s in out], roles.evaluation_hashes)
    return out

