"""COCO export of the curated dataset: real defect images and accepted synthetic samples with
their masks as RLE (uncompressed, column-major counts as in the COCO spec), categories = damage
types. Images are copied next to ``annotations.json``."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from pipelines.imageio import write_png_atomic
from studio.catalog import GOOD
from studio.store_types import check_name


def rle_encode(mask: np.ndarray) -> dict:
    """Binary [H x W] → {"size": [H, W], "counts": [...]} (column-major, starting with zeros)."""
    flat = (np.asarray(mask) > 0).ravel(order="F").astype(np.uint8)
    return {"size": list(mask.shape), "counts": _runs(flat)}


def _runs(flat: np.ndarray) -> list[int]:
    if flat.size == 0:
        return []
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    lengths = np.diff(np.r_[0, edges, flat.size]).tolist()
    return lengths if flat[0] == 0 else [0, *lengths]


def rle_decode(rle: dict) -> np.ndarray:
    h, w = rle["size"]
    flat = np.zeros(h * w, np.uint8)
    pos, val = 0, 0
    for n in rle["counts"]:
        flat[pos:pos + n] = val
        pos += n
        val ^= 1
    return flat.reshape((h, w), order="F").astype(bool)


def export_coco(store, product: str, out_dir: str | Path) -> dict:
    check_name(product, "product")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    cats: dict[str, int] = {}
    images, anns = [], []

    def add(kind: str, key: int, image: np.ndarray, mask: np.ndarray | None, label: str, extra: dict):
        name = f"{kind}_{key:06d}.png"
        write_png_atomic(out / "images" / name, image)
        img_id = len(images) + 1
        images.append({"id": img_id, "file_name": f"images/{name}", "height": int(image.shape[0]),
                       "width": int(image.shape[1]), "origin": kind, **extra})
        if label != GOOD and mask is not None and np.any(mask):
            cat = cats.setdefault(label, len(cats) + 1)
            ys, xs = np.nonzero(mask)
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cat, "iscrowd": 0,
                         "segmentation": rle_encode(mask), "area": int((mask > 0).sum()),
                         "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                  int(ys.max() - ys.min() + 1)]})

    for r in store.list_images(product=product, origin="real"):
        if r["split"] == "upload":
            continue
        add("real", r["id"], store.load_image(r["id"]), store.load_mask(r["id"]), r["label"],
            {"split": r["split"], "label": r["label"]})
    for s in store.list_samples(product=product, status="accepted"):
        add("synthetic", s["id"], store.load_sample_image(s["id"]), store.load_sample_mask(s["id"]),
            s["damage_type"] or "defect", {"generator": s["generator"], "seed": s["seed"],
                                           "label": s["damage_type"] or "defect"})
    doc = {"info": {"description": f"Defect Studio export of {product}"}, "images": images,
           "annotations": anns, "categories": [{"id": i, "name": n, "supercategory": product}
                                               for n, i in sorted(cats.items(), key=lambda kv: kv[1])]}
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh)
    os.replace(tmp, out / "annotations.json")
    return {"images": len(images), "annotations": len(anns), "categories": len(cats), "path": str(out)}
