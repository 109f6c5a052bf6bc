"""What every importer shares: one image (+ its mask) into the store, counted in a report."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from studio.store_types import ImportReport, StoreError, decode_file


def import_image(store, report: ImportReport, path: Path, product: str, split: str, label: str,
                 mask_path: Path | None, binarize_mask: bool = False) -> None:
    """Add ``path`` (a real image) with its mask; a refused file is reported, not raised."""
    try:
        mask = None
        if mask_path is not None:
            mask = decode_file(mask_path, "mask", store.max_pixels)
            if binarize_mask:
                mask = np.where(mask > 0, 255, 0).astype(np.uint8)
        image_id, created = store.put_image(product, path, split=split, label=label, origin="real",
                                            mask=mask, source_path=str(path))
    except StoreError as e:
        report.skipped.append((str(path), str(e)))
        return
    report.ids[path] = image_id
    if created:
        report.images += 1
    else:
        report.duplicates += 1
