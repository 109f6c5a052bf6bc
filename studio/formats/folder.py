"""A plain folder of images (one split and label for all)."""
from __future__ import annotations

from pathlib import Path

from studio.store_types import IMAGE_EXTENSIONS, SPLITS, ImportReport, StoreError, check_choice, check_name
from studio.formats.common import import_image


def import_images(store, folder, product, split="train", label="good") -> dict:
    """Import every image file directly in ``folder`` (not recursive). Files with other
    extensions, unreadable, corrupt or too-large images are skipped and reported."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise StoreError(f"{folder} is not a folder")
    check_name(product, "product")
    check_name(label, "label")
    check_choice(split, SPLITS, "split")
    report = ImportReport()
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or f.is_dir():
            continue
        if f.suffix.lower() not in IMAGE_EXTENSIONS:
            report.skipped.append((str(f), f"not an image file (extension {f.suffix or 'none'!r} "
                                           f"is not one of {', '.join(IMAGE_EXTENSIONS)})"))
            continue
        import_image(store, report, f, product, split, label, None)
    store.assign_missing_roles(product)
    return report.as_dict(product=product)

# ---- export --------------------------------------------------------------------------------
