"""What a trained generator learned from: reference real defects only, written down beside the model.

Trainers (LoRA + damage embedding, pixel-inpaint, ControlNet) read a category folder's real defects
through :func:`pipelines.training.training_data` (:func:`pipelines.roles.category_roles`, then
:func:`pipelines.guard.guard` on the arrays as built), so only ``reference`` images are trained on;
evaluation images — and copies of them — never are. :func:`training_manifest` lists those images and their pixel hashes, plus the
ancestors of any accepted synthetic samples added with ``extra_data``; ``training_data.json`` in
the model's output folder keeps it, and every sample the model makes records these hashes as its
ancestors (``samples.ancestors`` in the store, ``descends_from`` in an export), so the experiment
can refuse a synthetic set that descends from a scored image.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from pipelines import roles as R
from pipelines.fileio import atomic_write_json

MANIFEST = "training_data.json"


def extra_ancestors(extra: str | Path | None) -> tuple[list[str], list[str]]:
    """Ancestors named by an export's provenance.jsonl, and the synthetic files' own hashes."""
    if extra is None:
        return [], []
    extra = Path(extra)
    anc: set[str] = set()
    own: list[str] = []
    prov = extra / "provenance.jsonl"
    if prov.is_file():
        for line in prov.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            anc.update(a for a in rec.get("descends_from") or [] if isinstance(a, str))
            src = rec.get("source_image") or {}
            if isinstance(src, dict) and src.get("sha256"):
                anc.add(src["sha256"])
    if (extra / "synthetic").is_dir():
        from pipelines.guard import list_images
        for d in sorted(p for p in (extra / "synthetic").iterdir() if p.is_dir()):
            own += [R.file_pixel_hash(img) for img in list_images(d)]
    return sorted(anc), own


def training_manifest(root: str | Path, damage_types: Sequence[str] | None = None,
                      extra: str | Path | None = None) -> dict:
    """Reference defects of ``root`` that a trainer may use (chosen types), their hashes, and the
    ancestors of ``extra`` (read from its ``synthetic/`` and ``provenance.jsonl`` only). Raises
    :class:`pipelines.roles.LeakageError` when ``extra`` holds a sample that descends from (or is)
    one of ``root``'s evaluation images. :func:`pipelines.training.load_training_samples` adds
    ``fit_hashes`` / ``fit_files`` / ``counts`` — the pixel hashes of exactly the arrays fit
    (after resizing), as :func:`pipelines.guard.guard` returned them."""
    roles = R.folder_roles(root)
    chosen = [s for s in roles.reference if damage_types is None or s.label in damage_types]
    extra_anc, extra_own = extra_ancestors(extra)
    ev = roles.evaluation_hashes
    R.check_descent([(f"{extra}/synthetic", extra_anc + extra_own)], ev) if extra is not None else None
    ancestors = sorted({roles.hashes[s.path] for s in chosen} | set(extra_anc))
    return {
        "data": str(Path(root).resolve()),
        "roles_source": roles.source,
        "reference": roles.rel(chosen),
        "excluded_evaluation": len([s for s in roles.evaluation if damage_types is None or s.label in damage_types]),
        "ancestors": ancestors,
        "evaluation_ancestors": len(set(ancestors) & ev),   # 0: refused above otherwise
        "extra_data": None if extra is None else str(Path(extra).resolve()),
    }


def write_manifest(out_dir: str | Path, manifest: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(out / MANIFEST, manifest, indent=1)


def read_manifest(model: str | Path | None) -> dict:
    """The manifest of a model folder (or of the output folder above a checkpoint); ``{}`` if none."""
    if not model:
        return {}
    p = Path(model).expanduser()
    for folder in (p, *list(p.parents)[:2]):
        f = folder / MANIFEST
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except ValueError:
                return {}
    return {}


__all__ = ["MANIFEST", "extra_ancestors", "training_manifest", "write_manifest", "read_manifest"]
