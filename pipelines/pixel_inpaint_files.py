"""pixel-inpaint's files: the on-disk model format (``model.safetensors`` + ``config.json``, format
name, the two-stage schedule's stage names), the training crop, and where a product's model is
found (the environment variable, the workspace's trained runs, the shipped one). No torch: the
generator (:mod:`pipelines.pixel_inpaint`) and the model (:mod:`pipelines.pixel_inpaint_model`)
both import it, so neither imports the other back."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from pipelines import masks as mk
from pipelines.models import ModelError
from pipelines.training import latest_checkpoint

ENV = "DEFECT_STUDIO_PIXEL_INPAINT"
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "assets" / "models"   # <product>/pixel-inpaint/
SHIPPED_NAME = "pixel-inpaint"
FORMAT = "defect-studio-pixel-inpaint/1"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
NORMAL = "__normal__"
PRODUCT, DAMAGE = "product", "damage"          # the stages of the two-stage schedule
PRETRAIN_MASKS = ("shapes", "random")
TRAIN_HINT = ("train one with `python -m studio train --kind pixel-inpaint --data <MVTec category "
              "folder> --out <folder>` (about 15 min on a CPU) and pass model=<folder> or set "
              f"{ENV}=<folder>")


def crop_box(mask: np.ndarray, context: float, min_crop: int, jitter: np.random.Generator | None = None
             ) -> tuple[int, int, int, int]:
    """Square ``(x0, y0, x1, y1)`` around the mask: side max(min_crop, bbox side·context), clamped
    to the image (smaller images: the whole short side). ``jitter``: random scale/offset (training)."""
    h, w = mask.shape
    x0, y0, x1, y1 = mk.bbox(mask)  # type: ignore[misc]
    side = max(float(min_crop), max(x1 - x0, y1 - y0) * context)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    if jitter is not None:
        side *= jitter.uniform(0.85, 1.25)
        slack = max(0.0, side - max(x1 - x0, y1 - y0)) / 2.0
        cx += jitter.uniform(-slack, slack) * 0.8
        cy += jitter.uniform(-slack, slack) * 0.8
    side = int(round(min(side, h, w)))
    bx = int(round(min(max(cx - side / 2.0, 0), w - side)))
    by = int(round(min(max(cy - side / 2.0, 0), h - side)))
    return bx, by, bx + side, by + side




def _is_model_folder(folder: Path) -> bool:
    return (folder / MODEL_FILE).is_file() and (folder / CONFIG_FILE).is_file()


def resolve_model(model: str | os.PathLike | None) -> Path:
    """The folder to load for ``model`` (an output folder → its latest checkpoint; a checkpoint or
    an exported model folder as is; default the env variable); missing → :class:`ModelError` that
    says how to train one."""
    src = model or os.environ.get(ENV)
    if not src:
        raise ModelError(f"no pixel-inpaint model: {TRAIN_HINT}")
    path = Path(src).expanduser()
    folder = path if _is_model_folder(path) else latest_checkpoint(path)
    if folder is None or not _is_model_folder(folder):
        raise ModelError(f"{src} holds no pixel-inpaint checkpoint ({MODEL_FILE} + {CONFIG_FILE}): {TRAIN_HINT}")
    return folder


def read_meta(folder: Path) -> dict:
    """A model folder's ``config.json``, checked (valid JSON, this format, a U-Net config)."""
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder / CONFIG_FILE} is not valid JSON ({exc}): {TRAIN_HINT}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("unet"), dict):
        raise ModelError(f"{folder} is not a pixel-inpaint model ({CONFIG_FILE} format "
                         f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})")
    return meta


def check_model(model: str | os.PathLike | None) -> tuple[Path, dict]:
    """``(folder, meta)`` after checking, without loading weights, that the folder holds a readable
    model: ``config.json`` of this format and a complete safetensors file (header and data size)."""
    folder = resolve_model(model)
    meta = read_meta(folder)
    try:
        from safetensors import safe_open
        with safe_open(str(folder / MODEL_FILE), framework="numpy") as f:   # header only: no torch import
            n = len(list(f.keys()))
    except Exception as exc:   # noqa: BLE001 - safetensors raises several kinds on a bad file
        raise ModelError(f"{folder / MODEL_FILE} is corrupt or truncated ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); replace the folder: "
                         f"{TRAIN_HINT}") from exc
    if n == 0:
        raise ModelError(f"{folder / MODEL_FILE} holds no tensors: {TRAIN_HINT}")
    return folder, meta


def available(model: str | None = None) -> tuple[bool, str]:
    """``(ok, message)`` without loading weights."""
    try:
        return True, f"ready ({check_model(model)[0]})"
    except ModelError as exc:
        return False, str(exc)


# -- which model, when the request names none --------------------------------------------------
def shipped_model(product: str) -> Path:
    """Where the model shipped for ``product`` lives: ``assets/models/<product>/pixel-inpaint``."""
    return SHIPPED_DIR / product / SHIPPED_NAME


def _run_product(run: Path) -> str | None:
    """The product a training run belongs to: the name of its data folder (``training_data.json``)."""
    from pipelines.training_data import read_manifest
    data = read_manifest(run).get("data")
    return Path(data).name if data else None


def trained_models(product: str, roots: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Pixel-inpaint runs trained for ``product`` under ``roots`` (each root holds one folder per
    run, as ``<workspace>/adapters``), newest checkpoint first."""
    found = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for run in root.iterdir():
            if not run.is_dir() or _run_product(run) != product:
                continue
            ckpt = latest_checkpoint(run)
            if ckpt is None or not _is_model_folder(ckpt):
                continue
            try:
                if read_meta(ckpt).get("format") == FORMAT:
                    found.append(((ckpt / MODEL_FILE).stat().st_mtime_ns, run))
            except ModelError:
                continue
    return [run for _, run in sorted(found, key=lambda x: (-x[0], str(x[1])))]


def model_candidates(product: str | None, roots: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Where a model for ``product`` is looked for, in order: ``$DEFECT_STUDIO_PIXEL_INPAINT``, the
    product's trained runs under ``roots`` (newest first), the shipped model."""
    out = [Path(os.environ[ENV]).expanduser()] if os.environ.get(ENV) else []
    if product:
        out += trained_models(product, roots)
        out.append(shipped_model(product))
    return out


def find_model(product: str | None, roots: Sequence[str | os.PathLike] = (),
               damage_type: str | None = None) -> Path | None:
    """The first usable model of :func:`model_candidates` (trained for ``damage_type`` when one is
    given); None when there is none."""
    for cand in model_candidates(product, roots):
        try:
            _, meta = check_model(cand)
        except ModelError:
            continue
        if damage_type is None or damage_type == NORMAL or damage_type in meta.get("damage_types", ()):
            return cand
    return None


def product_status(product: str | None, roots: Sequence[str | os.PathLike] = ()) -> tuple[bool, str]:
    """``(ok, message)`` for generating on ``product`` with no model named (loads no weights).
    Without a product: ready when the env variable or any shipped model is usable."""
    if product:
        found = find_model(product, roots)
        if found is not None:
            return True, f"ready ({found})"
        where = shipped_model(product)
        shipped = "missing" if not where.exists() else available(str(where))[1]
        return False, (f"no pixel-inpaint model for product {product!r}: put one in {where} "
                       f"({MODEL_FILE} + {CONFIG_FILE} + training_data.json; shipped model: {shipped}), "
                       f"or {TRAIN_HINT}")
    if os.environ.get(ENV):
        return available(None)
    ready = sorted(p.parent.name for p in SHIPPED_DIR.glob(f"*/{SHIPPED_NAME}") if available(str(p))[0]) \
        if SHIPPED_DIR.is_dir() else []
    if ready:
        return True, (f"ready for {', '.join(ready)} (shipped models in {SHIPPED_DIR}); other products "
                      f"need a trained model: {TRAIN_HINT}")
    return False, (f"no pixel-inpaint model: none shipped in {SHIPPED_DIR}/<product>/{SHIPPED_NAME} "
                   f"(rebuild them with `python scripts/train_demo_models.py`) and {ENV} is not set; "
                   f"{TRAIN_HINT}")
