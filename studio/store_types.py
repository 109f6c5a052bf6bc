"""The store's vocabulary, shared by the store (:mod:`studio.dataset`) and the dataset formats
(:mod:`studio.formats`), neither of which the other needs to import for it: the user-facing
:class:`StoreError`, name / choice checks, the limits and constants of the layout, reading an image
or a mask fully (:func:`decode_file`, :func:`as_rgb`, :func:`as_mask`), folder listings, the
:class:`ImportReport` and the row helpers (seed, params JSON, timestamps)."""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines.fileio import atomic_write_bytes

MAX_PIXELS = 40_000_000               # larger images are refused (decompression-bomb guard)
MAX_FILE_BYTES = 512 * 1024 * 1024    # larger files are refused before they are opened
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "test", "upload")   # upload: a photo to paint on (never trained / scored)
ORIGINS = ("real", "synthetic")
STATUSES = ("candidate", "accepted", "rejected")
DEFAULT_DEFECT_LABEL = "defect"       # export/class-balance label of a sample without damage_type
EXPORT_MARKER = ".defect-studio-export.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")


class StoreError(ValueError):
    """A user-facing dataset error (bad input, unreadable image, unknown id, busy database)."""


# --------------------------------------------------------------------------------------------
# helpers: names, time, hashing, atomic files, image decoding
# --------------------------------------------------------------------------------------------
def now_iso() -> str:
    """ISO-8601 UTC timestamp, e.g. ``2025-01-31T12:00:00.123+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def check_name(value: Any, what: str) -> str:
    """The one check of a user-given name that becomes a path component (product, label, damage
    type, training run, checkpoint, export): letters, digits, ``_ . -`` only, at most 100, starting
    with a letter or digit, no ``..`` — so no separator, absolute path, NUL or control character."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or ".." in value:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "…'"
        raise StoreError(f"invalid {what} name {shown}: use 1-100 letters, digits, '_', '-' or '.' "
                         "(starting with a letter or digit)")
    return value


def check_choice(value: Any, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise StoreError(f"unknown {what} {value!r}; expected one of: {', '.join(choices)}")
    return value


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (its folder created) so that readers see nothing or the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def _check_pixels(width: int, height: int, max_pixels: int, name: str) -> None:
    if width <= 0 or height <= 0:
        raise StoreError(f"{name} is empty ({width}x{height})")
    if width * height > max_pixels:
        raise StoreError(f"{name} is too large: {width}x{height} = {width * height:,} pixels "
                         f"(the limit is {max_pixels:,})")


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """High-bit-depth or float pixel data → uint8 (16-bit is shifted, float is clipped to 0..255)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        return (arr >> 8).astype(np.uint8) if arr.max(initial=0) > 255 else arr.astype(np.uint8)
    return np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)


def _pil_to_array(im: Image.Image, kind: str) -> np.ndarray:
    """PIL image → ``[H x W x 3]`` uint8 (kind 'rgb') or ``[H x W]`` uint8 (kind 'mask')."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = _to_uint8(np.asarray(im))
        return np.repeat(arr[:, :, None], 3, axis=2) if kind == "rgb" else arr
    if kind == "rgb":
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    if im.mode in ("RGBA", "LA", "PA"):
        return np.asarray(im.getchannel("A"), dtype=np.uint8)
    return np.asarray(im.convert("L"), dtype=np.uint8)


def decode_file(path: Path, kind: str, max_pixels: int) -> np.ndarray:
    """Read an image file fully or raise :class:`StoreError` - never return half an image."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path} does not exist or is not a file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise StoreError(f"{path.name} is too large: {size / 2**20:.0f} MiB "
                         f"(the limit is {MAX_FILE_BYTES / 2**20:.0f} MiB)")
    try:
        with Image.open(path) as im:
            _check_pixels(im.width, im.height, max_pixels, path.name)
            im.load()  # a truncated or corrupt file fails here, not later
            return np.array(_pil_to_array(im, kind))
    except StoreError:
        raise
    except Image.DecompressionBombError as e:
        raise StoreError(f"{path.name} is too large (decompression bomb guard: {e})") from e
    except MemoryError as e:
        raise StoreError(f"{path.name} is too large to decode in memory") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, struct.error …
        raise StoreError(f"{path.name} is not a readable image ({type(e).__name__}: {e})") from e


def as_rgb(image: Any, max_pixels: int) -> np.ndarray:
    """``[H x W x 3]`` uint8 from an ndarray (gray, RGB or RGBA), a PIL image or a file path."""
    if isinstance(image, (str, Path)):
        return decode_file(Path(image), "rgb", max_pixels)
    if isinstance(image, Image.Image):
        _check_pixels(image.width, image.height, max_pixels, "image")
        return np.array(_pil_to_array(image, "rgb"))
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise StoreError(f"image array must be H x W x 3 (RGB), got shape {image.shape}")
        _check_pixels(arr.shape[1], arr.shape[0], max_pixels, "image")
        if arr.dtype != np.uint8:
            raise StoreError(f"image array must be uint8, got {arr.dtype}")
        return np.ascontiguousarray(arr[:, :, :3])
    raise StoreError(f"unsupported image type {type(image).__name__}: pass an ndarray, a PIL image or a path")


def as_mask(mask: Any, shape: tuple[int, int], max_pixels: int) -> np.ndarray | None:
    """``[H x W]`` uint8 mask (None stays None). 3-channel → max over channels, RGBA → alpha."""
    if mask is None:
        return None
    if isinstance(mask, (str, Path)):
        arr = decode_file(Path(mask), "mask", max_pixels)
    elif isinstance(mask, Image.Image):
        _check_pixels(mask.width, mask.height, max_pixels, "mask")
        arr = _pil_to_array(mask, "mask")
    elif isinstance(mask, np.ndarray):
        arr = mask
        if arr.ndim == 3 and arr.shape[2] == 4:
            arr = arr[:, :, 3]
        elif arr.ndim == 3 and arr.shape[2] in (1, 3):
            arr = arr.max(axis=2)
        if arr.ndim != 2:
            raise StoreError(f"mask must be H x W, got shape {mask.shape}")
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.nanmax(arr)) <= 1.0:
                arr = np.rint(np.nan_to_num(arr) * 255)
            arr = _to_uint8(arr)
    else:
        raise StoreError(f"unsupported mask type {type(mask).__name__}: pass an ndarray, a PIL image or a path")
    if arr.shape != tuple(shape):
        raise StoreError(f"mask size {arr.shape[1]}x{arr.shape[0]} does not match the image "
                         f"size {shape[1]}x{shape[0]}")
    return np.ascontiguousarray(arr, dtype=np.uint8)


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def subdirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


class ImportReport:
    """Accumulates an import report: new rows, duplicates, skipped files with their reason."""

    def __init__(self) -> None:
        self.images = 0
        self.samples = 0
        self.duplicates = 0
        self.skipped: list[tuple[str, str]] = []
        self.ids: dict[Path, int] = {}     # imported (or already present) file -> image id

    def as_dict(self, **extra) -> dict:
        return {"imported": self.images + self.samples, "images": self.images, "samples": self.samples,
                "duplicates": self.duplicates, "skipped": self.skipped, **extra}


def as_seed(seed: Any) -> int:
    if isinstance(seed, bool):
        raise StoreError(f"seed must be an integer, got {seed!r}")
    try:
        return int(seed)
    except (TypeError, ValueError):
        raise StoreError(f"seed must be an integer, got {seed!r}") from None


def _json_default(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def params_json(params: Any) -> str:
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise StoreError(f"params must be a dict, got {type(params).__name__}")
    try:
        return json.dumps(params, sort_keys=True, default=_json_default)
    except (TypeError, ValueError) as e:
        raise StoreError(f"params cannot be stored as JSON: {e}") from e


def decode_sample(row: dict) -> dict:
    row = dict(row)
    row["params"] = json.loads(row["params"]) if row.get("params") else {}
    row["ancestors"] = json.loads(row["ancestors"]) if row.get("ancestors") else []
    return row


def iso_or(value: Any, default: str) -> str:
    if isinstance(value, str):
        try:
            datetime.fromisoformat(value)
            return value
        except ValueError:
            pass
    return default
