"""Reading an MVTec-AD-layout category folder for evaluation (PatchCore, DDPM, experiments).

  CATEGORY/train/good/*.png
  CATEGORY/test/good/*.png, CATEGORY/test/<defect>/NNN.png
  CATEGORY/ground_truth/<defect>/NNN_mask.png
A KolektorSDD2 folder is read directly too (:func:`is_ksdd2`):
  FOLDER/train/NNNNN.png + FOLDER/train/NNNNN_GT.png, FOLDER/test/… likewise
where a ground truth without any nonzero pixel marks a good image; defects get the label
``defect``. PatchCore fits on the good train images; defective train images are left out.
Layout problems raise ``LayoutError`` with a message that says what is wrong and where.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pipelines.imageio import IMAGE_SUFFIXES, ImageInputError, read_mask, read_rgb


class LayoutError(ValueError):
    """The folder is not an MVTec-AD-layout category (message says what is missing)."""


@dataclass(frozen=True)
class TestSample:
    path: Path
    label: str                      # 'good' or the defect folder name
    mask_path: Path | None          # None for good images

    @property
    def is_anomaly(self) -> bool:
        return self.label != "good"


@dataclass
class Category:
    root: Path
    train: list[Path]
    test: list[TestSample]
    defect_types: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.root.name


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def mask_filename(stem: str) -> str:
    """The ground-truth file name this studio writes for image ``stem`` (MVTec AD's rule)."""
    return f"{stem}_mask.png"


def find_mask(gt_dir: Path, image: Path | str) -> Path | None:
    """The one mask-naming rule, for every reader: in ``gt_dir``, ``<stem>_mask.png`` (MVTec AD),
    then ``<stem>.png`` (VisA, plain folders), then ``<stem>_mask<suffix>``. ``image`` is the
    image's path or its stem."""
    p = Path(image)
    stem, suffix = (p.stem, p.suffix) if p.suffix else (p.name, ".png")
    for name in (mask_filename(stem), f"{stem}.png", f"{stem}_mask{suffix}"):
        if (Path(gt_dir) / name).is_file():
            return Path(gt_dir) / name
    return None


def _mask_for(root: Path, label: str, img: Path) -> Path | None:
    return find_mask(root / "ground_truth" / label, img)


KSDD2_GT_SUFFIX = "_GT"
KSDD2_DEFECT_LABEL = "defect"


def is_ksdd2(root: str | Path) -> bool:
    """A KolektorSDD2-layout folder: ``train/`` or ``test/`` holds ``*_GT.*`` ground truths beside
    the images (no MVTec ``train/good`` sub-folder)."""
    root = Path(root)
    return any((root / s).is_dir() and next((root / s).glob(f"*{KSDD2_GT_SUFFIX}.*"), None) is not None
               for s in ("train", "test"))


def _nonzero(path: Path) -> np.ndarray:
    """A ground truth as bool [H x W]: any nonzero pixel (KolektorSDD2 masks may be 0/1 or 0/255)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L")) > 0
    except Exception as exc:  # noqa: BLE001 — PIL raises many types for unreadable files
        raise LayoutError(f"{path} is not a readable ground-truth image: {exc}") from exc


def ksdd2_pairs(folder: Path) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """``(image, ground truth)`` pairs of one KolektorSDD2 split folder, and the images that have
    no ``<stem>_GT.png`` beside them."""
    pairs, missing = [], []
    for img in _images(folder):
        if img.stem.endswith(KSDD2_GT_SUFFIX):
            continue
        gt = next((c for c in (folder / f"{img.stem}{KSDD2_GT_SUFFIX}.png",
                               folder / f"{img.stem}{KSDD2_GT_SUFFIX}{img.suffix}") if c.is_file()), None)
        (pairs.append((img, gt)) if gt is not None else missing.append(img))
    return pairs, missing


def _load_ksdd2(root: Path, require_test: bool) -> Category:
    """A KolektorSDD2 folder as a :class:`Category` (good train images; test good + ``defect``)."""
    split: dict[str, list[TestSample]] = {"train": [], "test": []}
    for name in split:
        if not (root / name).is_dir():
            continue
        pairs, missing = ksdd2_pairs(root / name)
        if missing:
            raise LayoutError(f"{missing[0].relative_to(root)} has no ground truth {missing[0].stem}"
                              f"{KSDD2_GT_SUFFIX}.png beside it (KolektorSDD2 layout; {len(missing)} such image(s))")
        for img, gt in pairs:
            bad = bool(_nonzero(gt).any())
            split[name].append(TestSample(img, KSDD2_DEFECT_LABEL if bad else "good", gt if bad else None))
    train = [s.path for s in split["train"] if not s.is_anomaly]
    if not train:
        raise LayoutError(f"{root}/train holds no good images (a KolektorSDD2 good image has an all-black "
                          f"NNNNN{KSDD2_GT_SUFFIX}.png)")
    test = split["test"]
    if require_test and (not any(s.is_anomaly for s in test) or all(s.is_anomaly for s in test)):
        raise LayoutError(f"{root}/test needs both good and defective images to measure AUROC")
    return Category(root, train, test, sorted({s.label for s in test if s.is_anomaly}))


def load_category(root: str | Path, require_masks: bool = True, require_test: bool = True) -> Category:
    """Index a category folder. With ``require_masks``, every defective test image needs a mask."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{root} is not a folder")
    if not (root / "train" / "good").is_dir() and is_ksdd2(root):
        return _load_ksdd2(root, require_test)
    train_dir = root / "train" / "good"
    if not train_dir.is_dir():
        hint = ""
        subs = [p.name for p in root.iterdir() if p.is_dir()][:8]
        if any((root / s / "train" / "good").is_dir() for s in subs):
            hint = f" (it holds categories: {', '.join(subs)} — pass one of them)"
        raise LayoutError(f"{root} has no train/good folder; expected the MVTec AD layout "
                          f"CATEGORY/train/good, CATEGORY/test/<type>, CATEGORY/ground_truth/<type>, or the "
                          f"KolektorSDD2 layout train/NNNNN.png + NNNNN_GT.png{hint}")
    train = _images(train_dir)
    if not train:
        raise LayoutError(f"{train_dir} holds no images")
    test: list[TestSample] = []
    test_dir = root / "test"
    if test_dir.is_dir():
        for label_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            label = label_dir.name
            for img in _images(label_dir):
                mask = None if label == "good" else _mask_for(root, label, img)
                if label != "good" and mask is None and require_masks:
                    raise LayoutError(
                        f"test image {img.relative_to(root)} has no ground-truth mask (looked for "
                        f"ground_truth/{label}/{img.stem}_mask.png)")
                test.append(TestSample(img, label, mask))
    if require_test:
        if not test:
            raise LayoutError(f"{root} has no test images (test/good, test/<defect>)")
        if not any(s.is_anomaly for s in test) or all(s.is_anomaly for s in test):
            raise LayoutError(f"{root}/test needs both good and defective images to measure AUROC")
    defects = sorted({s.label for s in test if s.is_anomaly})
    return Category(root, train, test, defects)


def _header_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header (no decoding)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as exc:  # noqa: BLE001 — PIL raises many types for unreadable files
        raise LayoutError(f"{path} is not a readable image: {exc}") from exc


def check_sizes(category: Category) -> list[str]:
    """Check image and mask sizes before a run.

    A ground-truth mask of another size than its image is an error (``LayoutError``: resizing
    it would misplace the defect). Images of mixed sizes are allowed — every model here
    resizes to a square working size — but come back as a note for the user, since mixed
    sizes (and non-square ones, which get squashed) usually mean a mixed-up folder."""
    sizes: dict[tuple[int, int], int] = {}
    for path in category.train:
        wh = _header_size(path)
        sizes[wh] = sizes.get(wh, 0) + 1
    for s in category.test:
        wh = _header_size(s.path)
        sizes[wh] = sizes.get(wh, 0) + 1
        if s.mask_path is not None:
            mwh = _header_size(s.mask_path)
            if mwh != wh:
                raise LayoutError(
                    f"{s.mask_path} is {mwh[0]}×{mwh[1]} but its image {s.path} is {wh[0]}×{wh[1]}: "
                    "a ground-truth mask must have its image's size")
    notes = []
    if len(sizes) > 1:
        listed = ", ".join(f"{w}×{h} ({n})" for (w, h), n in sorted(sizes.items(), key=lambda kv: -kv[1]))
        notes.append(f"images come in {len(sizes)} sizes: {listed}; all are resized to the working "
                     "size, so check that they belong to one product and camera")
    if any(w != h for w, h in sizes):
        notes.append("non-square images are resized to a square working size (aspect ratio not kept)")
    return notes


def load_image(path: Path, size: int | None) -> np.ndarray:
    """RGB uint8, resized to size×size (area interpolation) when ``size`` is given."""
    try:
        img = read_rgb(path)
    except ImageInputError as exc:
        raise LayoutError(str(exc)) from exc
    if size and img.shape[:2] != (size, size):
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return img


def load_mask(sample: TestSample, size: int | None, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Ground truth as bool [H x W]; all False for good images."""
    if sample.mask_path is None:
        hw = (size, size) if size else shape
        if hw is None:
            hw = read_rgb(sample.path).shape[:2]
        return np.zeros(hw, bool)
    try:
        m = read_mask(sample.mask_path)
    except ImageInputError as exc:
        raise LayoutError(str(exc)) from exc
    if not m.any():     # a 0/1 ground truth (KolektorSDD2 and others): any nonzero pixel is defect
        m = np.where(_nonzero(sample.mask_path), 255, 0).astype(np.uint8)
    if size and m.shape != (size, size):
        m = cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST)
    return m > 0


def load_positives(folder: str | Path, size: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Defect images with masks for a positive bank: ``(image, mask)`` of :func:`load_named_positives`."""
    return [(img, m) for _, img, m in load_named_positives(folder, size)]


def provenance_names(folder: str | Path) -> dict[str, str]:
    """``{"synthetic/<type>/<file>": "sample 12"}`` from an export's provenance.jsonl (to name a
    refused file by the sample it came from); ``{}`` without one."""
    prov = Path(folder) / "provenance.jsonl"
    out: dict[str, str] = {}
    if not prov.is_file():
        return out
    for line in prov.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("file"), str):
            sid = rec.get("sample_id")
            out[rec["file"]] = f"sample {sid}" if sid is not None else str(rec.get("note") or rec.get("generator") or "")
    return out


def export_samples(folder: str | Path, size: int | None, damage_types=None, missing: str = ""
                   ) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """The accepted synthetic defects of an export: ``(name, type, image, mask bool)`` from
    ``synthetic/<type>/*`` (every supported image extension) + ``synthetic_ground_truth/<type>/``;
    ``name`` is the file, with the sample it came from (provenance.jsonl) when known. Only
    ``synthetic/`` is read — never the export's ``test/`` (the product's real images, scored ones
    included); a folder without ``synthetic/`` raises :class:`LayoutError` ending in ``missing``
    (what the route takes instead)."""
    folder = Path(folder)
    if not (folder / "synthetic").is_dir():
        raise LayoutError(f"{folder} holds no synthetic/ folder: pass an export of accepted samples (python -m "
                          f"studio export …: synthetic/<type>/ + synthetic_ground_truth/<type>/){missing}")
    known = provenance_names(folder)
    out = []
    for label_dir in sorted(p for p in (folder / "synthetic").iterdir() if p.is_dir()):
        if label_dir.name == "good" or (damage_types is not None and label_dir.name not in damage_types):
            continue
        for img in _images(label_dir):
            cand = find_mask(folder / "synthetic_ground_truth" / label_dir.name, img)
            if cand is not None:
                rel = img.relative_to(folder).as_posix()
                name = f"{img} ({known[rel]})" if known.get(rel) else str(img)
                out.append((name, label_dir.name, load_image(img, size),
                            load_mask(TestSample(img, label_dir.name, cand), size)))
    return out


def load_named_positives(folder: str | Path, size: int | None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Accepted synthetic defects of an export for a positive bank: ``(file, image, mask)``
    (:func:`export_samples`); none with a mask is refused."""
    out = [(n, img, m) for n, _, img, m in export_samples(
        folder, size, missing="; real reference defects of --data are already in the dual bank")]
    if not out:
        raise LayoutError(f"{folder} holds no defect images with masks (expected synthetic/<type>/NNN.png "
                          "+ synthetic_ground_truth/<type>/NNN_mask.png, as written by export)")
    return out
