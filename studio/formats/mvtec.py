"""MVTec AD layout: import a category (and the synthetic part of an export), export a product.

Import reads ``train/<label>/*``, ``test/<label>/*`` with ``ground_truth/<label>/<stem>_mask.png``
(``train_ground_truth`` for masked train images), ``synthetic/<label>/*`` with
``synthetic_ground_truth/<label>/<stem>_mask.png`` and ``provenance.jsonl``, and
``evaluation.txt`` (data roles). Mask files follow one naming rule,
:func:`pipelines.mvtec.find_mask`. Export writes the same layout (``NNN.png`` +
``NNN_mask.png``), ``provenance.jsonl``, ``evaluation.txt`` and a marker file.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from pipelines import roles as R
from pipelines.fileio import fsync_dir
from pipelines.mvtec import find_mask, mask_filename
from studio.store_types import (DEFAULT_DEFECT_LABEL, EXPORT_MARKER, ImportReport, StoreError, as_mask,
                                as_seed, atomic_write, check_name, decode_file, decode_sample, image_files,
                                iso_or, now_iso, params_json, subdirs, NAME_RE)
from studio.formats.common import import_image


def import_category(store, category_dir, product=None) -> dict:
    """Import an MVTec AD category folder (and the synthetic part of an :meth:`export_mvtec`).

    Reads ``train/<label>/*``, ``test/<label>/*`` with ``ground_truth/<label>/<stem>_mask.png``
    (``train_ground_truth`` for masked train images), ``synthetic/<label>/*`` with
    ``synthetic_ground_truth/<label>/<stem>_mask.png`` and ``provenance.jsonl``. Idempotent.
    Returns ``{'imported', 'images', 'samples', 'duplicates', 'skipped': [(path, reason)]}``.
    """
    root = Path(category_dir).expanduser()
    if not root.is_dir():
        raise StoreError(f"{root} is not a folder")
    if not any((root / d).is_dir() for d in ("train", "test", "synthetic")):
        raise StoreError(f"{root} does not look like an MVTec AD category: no train/ or test/ folder")
    product = check_name(product or root.name, "product")
    report = ImportReport()
    for split, gt_name in (("train", "train_ground_truth"), ("test", "ground_truth")):
        for label_dir in subdirs(root / split):
            label = label_dir.name
            if not NAME_RE.match(label):
                report.skipped.append((str(label_dir), f"invalid label folder name {label!r}"))
                continue
            for f in image_files(label_dir):
                import_image(store, report, f, product, split, label,
                                   find_mask(root / gt_name / label, f))
    _import_synthetic(store, report, root, product)
    _roles_after_import(store, report, root, product)
    return report.as_dict(product=product)


def _roles_after_import(store, report: ImportReport, root: Path, product: str) -> None:
    """A folder's ``evaluation.txt`` (written by exports) decides the roles of the images it
    brought; every other real defect image without a role gets the deterministic rule's."""
    listed = R.read_evaluation_file(root)
    if listed is not None:
        roles = {}
        for path, image_id in report.ids.items():
            row = store.get_image(image_id)
            if row["label"] != "good" and row["origin"] == "real":
                rel = path.relative_to(root).as_posix()
                roles[image_id] = R.EVALUATION if rel in listed else R.REFERENCE
        store.set_roles(roles)
    store.assign_missing_roles(product)


def _import_synthetic(store, report: ImportReport, root: Path, product: str) -> None:
    provenance: dict[str, dict] = {}
    prov_file = root / "provenance.jsonl"
    if prov_file.is_file():
        for n, line in enumerate(prov_file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                provenance[str(rec["file"])] = rec
            except (ValueError, KeyError, TypeError) as e:
                report.skipped.append((f"{prov_file}:{n}", f"bad provenance line ({e})"))
    for label_dir in subdirs(root / "synthetic"):
        label = label_dir.name
        for f in image_files(label_dir):
            rec = provenance.get(f"synthetic/{label}/{f.name}", {})
            try:
                created = _import_one_synthetic(store, root, product, label, f, rec)
            except StoreError as e:
                report.skipped.append((str(f), str(e)))
                continue
            if created:
                report.samples += 1
            else:
                report.duplicates += 1


def _import_one_synthetic(store, root: Path, product: str, label: str, f: Path, rec: dict) -> bool:
    mask_file = find_mask(root / "synthetic_ground_truth" / label, f)
    if mask_file is None:
        raise StoreError(f"no mask for {f.name} in synthetic_ground_truth/{label}/")
    rgb = decode_file(f, "rgb", store.max_pixels)
    mask = as_mask(decode_file(mask_file, "mask", store.max_pixels), rgb.shape[:2], store.max_pixels)
    damage_type = rec.get("damage_type", label) if rec else label
    if damage_type is not None:
        check_name(damage_type, "damage type")
    source_id = None
    src = rec.get("source_image") or {}
    if isinstance(src, dict) and src.get("sha256"):
        hit = store.query("SELECT id FROM images WHERE product = ? AND sha256 = ? ORDER BY id LIMIT 1",
                          (product, src["sha256"]))
        source_id = hit[0]["id"] if hit else None
    now = now_iso()
    params = rec.get("params", {})
    record = {
        "product": product, "damage_type": damage_type, "source_image_id": source_id,
        "color": rec.get("color"), "generator": str(rec.get("generator") or "external"),
        "generator_version": str(rec.get("generator_version") or ""),
        "params": params_json(params if isinstance(params, dict) else {"value": params}),
        "seed": as_seed(rec.get("seed", 0)), "status": "accepted",
        "note": str(rec.get("note") or ("imported without provenance" if not rec else "")),
        "batch_id": rec.get("batch_id"),
        "created_at": iso_or(rec.get("created_at"), now), "updated_at": iso_or(rec.get("updated_at"), now),
        "reviewed_at": iso_or(rec.get("reviewed_at"), now),
    }
    anc = {a for a in rec.get("descends_from") or [] if isinstance(a, str)}
    if isinstance(src, dict) and src.get("sha256"):
        anc.add(src["sha256"])
    record["ancestors"] = json.dumps(sorted(anc))
    return store.put_sample(record, rgb, mask, dedupe=True)[1]


def export_product(store, out_dir, product) -> dict:
    """Write ``OUT/<product>/`` in MVTec AD layout: real images to ``train/<label>``,
    ``test/<label>/NNN.png`` + ``ground_truth/<label>/NNN_mask.png``; accepted samples to
    ``synthetic/<label>/NNN.png`` + ``synthetic_ground_truth/<label>/NNN_mask.png`` with one
    ``provenance.jsonl`` line each (``descends_from``: the real images it descends from), and
    ``evaluation.txt`` (the data roles). Built in a temporary folder and swapped in; an existing
    target is only replaced when it is a previous export of this studio."""
    check_name(product, "product")
    images = store.list_images(product=product)
    samples = store.query("SELECT * FROM samples WHERE product = ? AND status = 'accepted' ORDER BY id",
                          (product,))
    if not images and not samples:
        raise StoreError(f"nothing to export for product {product!r}")
    out_dir = Path(out_dir).expanduser()
    target = out_dir / product
    if target.exists() and not (target / EXPORT_MARKER).is_file():
        raise StoreError(f"{target} exists and is not a previous Defect Studio export; "
                         "choose an empty output folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{product}.export-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        w = _Writer(store, tmp)
        exported = w.real_images([r for r in images if r["origin"] == "real" and r["split"] in ("train", "test")])
        w.external_synthetic([r for r in images if r["origin"] == "synthetic"])
        w.samples([decode_sample(s) for s in samples], exported)
        w.manifests(product, exported)
        _swap_in(tmp, target, out_dir, product)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": str(target), "product": product, **w.counts}


class _Writer:
    """Copies files into the export folder, numbering them per (folder, label)."""

    def __init__(self, store, tmp: Path):
        self.store, self.tmp = store, tmp
        self.counters: dict[tuple[str, str], int] = {}
        self.counts = {"train": 0, "test": 0, "masks": 0, "synthetic": 0}
        self.provenance: list[dict] = []

    def next_name(self, folder: str, label: str) -> str:
        n = self.counters.get((folder, label), 0)
        self.counters[(folder, label)] = n + 1
        return f"{n:03d}"

    def copy(self, rel: str, dest: Path) -> None:
        src = self.store.root / rel
        if not src.is_file():
            raise StoreError(f"cannot export: the file {src} is missing (see dangling_rows())")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)

    def real_images(self, rows: list[dict]) -> dict[int, dict]:
        exported = {}
        for r in rows:
            name = self.next_name(r["split"], r["label"])
            rel = f"{r['split']}/{r['label']}/{name}.png"
            self.copy(r["path"], self.tmp / rel)
            self.counts[r["split"]] += 1
            if r["mask_path"]:
                gt = "ground_truth" if r["split"] == "test" else "train_ground_truth"
                self.copy(r["mask_path"], self.tmp / gt / r["label"] / mask_filename(name))
                self.counts["masks"] += 1
            exported[r["id"]] = {"file": rel, "sha256": r["sha256"], "role": r.get("role")}
        return exported

    def external_synthetic(self, rows: list[dict]) -> None:
        """Images added with origin='synthetic': no generator provenance."""
        for r in rows:
            entry = {"generator": "external", "generator_version": "", "params": {}, "seed": 0,
                     "damage_type": r["label"],
                     "note": f"external synthetic image {r['source_path'] or ''}".strip(),
                     "created_at": r["created_at"], "updated_at": r["created_at"],
                     "reviewed_at": r["created_at"]}
            self.synthetic(r["label"], r["path"], r["mask_path"], entry)

    def samples(self, samples: list[dict], exported: dict[int, dict]) -> None:
        for s in samples:
            src = exported.get(s["source_image_id"]) if s["source_image_id"] is not None else None
            entry = {k: s[k] for k in ("damage_type", "color", "generator", "generator_version", "params",
                                        "seed", "note", "batch_id", "created_at", "updated_at",
                                        "reviewed_at", "width", "height")}
            entry["sample_id"] = s["id"]
            entry["descends_from"] = s["ancestors"]
            entry["source_image"] = ({**src, "id": s["source_image_id"]} if src else
                                     None if s["source_image_id"] is None else {"id": s["source_image_id"]})
            self.synthetic(s["damage_type"] or DEFAULT_DEFECT_LABEL, s["image_path"], s["mask_path"], entry)

    def synthetic(self, label: str, image_rel: str, mask_rel: str | None, entry: dict) -> None:
        name = self.next_name("synthetic", label)
        rel = f"synthetic/{label}/{name}.png"
        self.copy(image_rel, self.tmp / rel)
        mask = None
        if mask_rel:
            mask = f"synthetic_ground_truth/{label}/{mask_filename(name)}"
            self.copy(mask_rel, self.tmp / mask)
        self.provenance.append({"file": rel, "mask": mask, "label": label, **entry})

    def manifests(self, product: str, exported: dict[int, dict]) -> None:
        """``evaluation.txt``, ``provenance.jsonl`` and the export marker."""
        self.counts["synthetic"] = len(self.provenance)
        evaluated = sorted(e["file"] for e in exported.values() if e.get("role") == R.EVALUATION)
        atomic_write(self.tmp / R.EVALUATION_FILE, "".join(
            ["# Defect Studio data roles: these real defect images are only ever scored; every other\n"
             "# real defect image here is 'reference' (may be learned from or copied).\n"]
            + [f + "\n" for f in evaluated]).encode())
        self.counts["evaluation"] = len(evaluated)
        atomic_write(self.tmp / "provenance.jsonl",
                     "".join(json.dumps(p, sort_keys=True) + "\n" for p in self.provenance).encode())
        atomic_write(self.tmp / EXPORT_MARKER, json.dumps(
            {"product": product, "exported_at": now_iso(), "workspace": str(self.store.root), **self.counts},
            indent=1).encode())


def _swap_in(tmp: Path, target: Path, out_dir: Path, product: str) -> None:
    """Replace ``target`` by the finished ``tmp`` folder (a previous export is removed after)."""
    if target.exists():
        old = out_dir / f".{product}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    fsync_dir(out_dir)
