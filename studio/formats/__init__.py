"""Dataset formats, each in its own module: MVTec AD (import + export), VisA, KolektorSDD2 and plain
folders (import), COCO (export). They use the store's public API and the store's vocabulary
(:mod:`studio.store_types`) only — never :mod:`studio.dataset`, which keeps only the store.
:func:`import_any` is the one way in: what the CLI's ``import``, the Dataset tab and the store's
``import_mvtec`` call."""
from __future__ import annotations

from pathlib import Path

KINDS = ("auto", "mvtec", "visa", "ksdd2", "folder")


def detect(path: str | Path) -> str:
    """The layout of a folder: ``ksdd2`` (``train/*_GT.png``), ``mvtec`` (``train/`` or ``test/``
    sub-folders), ``visa`` (``Data/Images``), else a plain ``folder`` of images."""
    from pipelines.mvtec import is_ksdd2
    src = Path(path)
    if not (src / "train" / "good").is_dir() and is_ksdd2(src):
        return "ksdd2"
    if (src / "train").is_dir() or (src / "test").is_dir():
        return "mvtec"
    if (src / "Data" / "Images").is_dir():
        return "visa"
    return "folder"


def import_any(store, path, kind: str = "auto", product: str | None = None, split: str = "train",
               label: str = "good") -> dict:
    """Import ``path`` in layout ``kind`` (``auto``: :func:`detect`); returns the import report
    with ``kind`` added. A plain folder needs a product name."""
    from studio.formats import folder as plain
    from studio.formats import ksdd2, mvtec, visa
    from studio.store_types import StoreError
    if kind not in KINDS:
        raise StoreError(f"unknown layout {kind!r}; known: {', '.join(KINDS)}")
    src = Path(path).expanduser()
    if not src.is_dir():
        raise StoreError(f"{src} is not a folder")
    kind = detect(src) if kind == "auto" else kind
    if kind == "mvtec":
        report = mvtec.import_category(store, src, product or None)
    elif kind == "visa":
        report = visa.import_category(store, src, product or None)
    elif kind == "ksdd2":
        report = ksdd2.import_folder(store, src, product or src.name)
    else:
        if not product:
            raise StoreError("give a product name to import a plain folder of images")
        report = plain.import_images(store, src, product, split, label)
    return {**report, "kind": kind}
