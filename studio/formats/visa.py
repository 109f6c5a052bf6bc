"""VisA layout: ``Data/Images/{Normal,Anomaly}/*``, ``Data/Masks/Anomaly/<stem>.png`` and the
split file ``split_csv/1cls.csv``."""
from __future__ import annotations

import csv
from pathlib import Path

from pipelines.mvtec import find_mask
from studio.store_types import ImportReport, StoreError, check_name, image_files
from studio.formats.common import import_image


def import_category(store, category_dir, product=None) -> dict:
    """Import a VisA category: ``Data/Images/Normal/*``, ``Data/Images/Anomaly/*`` and
    ``Data/Masks/Anomaly/<stem>.png``; splits from ``split_csv/1cls.csv`` (in the category or its
    parent; columns object,split,label,image,mask) when present, else normal → train/good and
    anomaly → test/anomaly. Masks are binarised to 0/255."""
    root = Path(category_dir).expanduser()
    images_dir = root / "Data" / "Images"
    if not images_dir.is_dir():
        raise StoreError(f"{root} does not look like a VisA category: no Data/Images folder")
    product = check_name(product or root.name, "product")
    report = ImportReport()
    entries = _visa_csv_entries(root, report)
    split_source = "csv" if entries else "folders"
    if not entries:
        masks_dir = root / "Data" / "Masks" / "Anomaly"
        entries = [(f, "train", "good", None) for f in image_files(images_dir / "Normal")]
        entries += [(f, "test", "anomaly", find_mask(masks_dir, f))
                    for f in image_files(images_dir / "Anomaly")]
    for path, split, label, mask in entries:
        import_image(store, report, path, product, split, label, mask, binarize_mask=True)
    store.assign_missing_roles(product)
    return report.as_dict(product=product, split_source=split_source)


def _visa_csv_entries(root: Path, report: ImportReport) -> list[tuple[Path, str, str, Path | None]]:
    csv_path = next((p for p in (root / "split_csv" / "1cls.csv", root.parent / "split_csv" / "1cls.csv")
                     if p.is_file()), None)
    if csv_path is None:
        return []
    entries = []
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"split", "label", "image"} - set(reader.fieldnames or [])
        if missing:
            raise StoreError(f"{csv_path} lacks the column(s) {', '.join(sorted(missing))}")
        for row in reader:
            if (row.get("object") or root.name).strip() != root.name:
                continue
            split = (row["split"] or "").strip().lower()
            try:
                image = _resolve_visa(root, row["image"] or "")
                mask = _resolve_visa(root, row["mask"]) if (row.get("mask") or "").strip() else None
            except StoreError as exc:
                report.skipped.append((str(row["image"]), f"{exc} ({csv_path.name})"))
                continue
            if split not in ("train", "test"):
                report.skipped.append((str(image), f"unknown split {row['split']!r} in {csv_path.name}"))
                continue
            label = "good" if (row["label"] or "").strip().lower() == "normal" else "anomaly"
            entries.append((image, split, label, mask))
    return entries


def _resolve_visa(root: Path, rel: str) -> Path:
    """VisA's csv paths start at the dataset root (``candle/Data/Images/...``); the file they name
    must lie inside the category folder ``root`` (an absolute path, ``..`` or a link out of it is a
    :class:`StoreError`)."""
    rel_path = Path(rel.strip())
    if rel_path.is_absolute() or ".." in rel_path.parts or "\x00" in rel:
        raise StoreError(f"csv path {rel.strip()!r} leaves the category folder {root.name}")
    candidates = [root.parent / rel_path, root / rel_path]
    if len(rel_path.parts) > 1:
        candidates.append(root / Path(*rel_path.parts[1:]))
    real_root = root.resolve()
    inside = [c for c in candidates if real_root in c.resolve().parents]
    if not inside:
        raise StoreError(f"csv path {rel.strip()!r} leaves the category folder {root.name}")
    return next((c for c in inside if c.is_file()), inside[0])
