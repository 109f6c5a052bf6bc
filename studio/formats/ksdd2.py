"""KolektorSDD2 layout: ``train/NNNNN.png`` with ``train/NNNNN_GT.png``, the same under ``test/``;
a ground truth with no nonzero pixel marks a good image. Defects get the label ``defect`` (the data
set has one class); masks are binarised to 0/255 (any nonzero pixel is defect). The layout rules
(file names, the label) are :mod:`pipelines.mvtec`'s, which also reads such a folder directly for
PatchCore, the experiment and DDPM."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.mvtec import KSDD2_DEFECT_LABEL as DEFECT_LABEL
from pipelines.mvtec import KSDD2_GT_SUFFIX as GT_SUFFIX
from pipelines.mvtec import ksdd2_pairs
from studio.store_types import ImportReport, StoreError, check_name, decode_file

def _pairs(folder: Path, report: ImportReport) -> list[tuple[Path, Path]]:
    pairs, missing = ksdd2_pairs(folder)
    for f in missing:
        report.skipped.append((str(f), f"no ground truth {f.stem}{GT_SUFFIX}.png beside it"))
    return pairs


def import_folder(store, folder, product="ksdd2") -> dict:
    """Import ``folder/{train,test}``; good images → ``<split>/good``, defects → ``<split>/defect``."""
    root = Path(folder).expanduser()
    if not any((root / s).is_dir() for s in ("train", "test")):
        raise StoreError(f"{root} does not look like KolektorSDD2: no train/ or test/ folder")
    product = check_name(product, "product")
    report = ImportReport()
    for split in ("train", "test"):
        if not (root / split).is_dir():
            continue
        for img, gt in _pairs(root / split, report):
            try:
                mask = np.where(decode_file(gt, "mask", store.max_pixels) > 0, 255, 0).astype(np.uint8)
                defect = bool(mask.any())
                image_id, created = store.put_image(
                    product, img, split=split, label=DEFECT_LABEL if defect else "good", origin="real",
                    mask=mask if defect else None, source_path=str(img))
            except StoreError as e:
                report.skipped.append((str(img), str(e)))
                continue
            report.ids[img] = image_id
            report.images += int(created)
            report.duplicates += int(not created)
    store.assign_missing_roles(product)
    return report.as_dict(product=product)
